"""seg.data.augment: image and mask stay aligned, padding is ignore, sizes are exact."""
from __future__ import annotations

import ml_collections
import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from configs import common
from conftest import decode, palette_coded
from seg.data import synthetic, augment


def data_cfg(**overrides) -> ml_collections.ConfigDict:
    c = common.get_base_config().data
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def coded():
    """Scenes of the synthetic dataset (3 classes, ignore bands), coloured by label."""
    return palette_coded(synthetic.generate("val", 6, (40, 56), num_classes=3).masks)


def outputs(transform, dataset, draws=4):
    torch.manual_seed(0)
    return [augment.apply(transform, *dataset.read(i)) for i in range(len(dataset))
            for _ in range(draws)]


def interior(mask, radius=2):
    """Pixels whose (2r+1)^2 neighbourhood holds one label, not ignore: away from boundaries,
    where a bilinear image and a nearest mask must agree."""
    x = mask[None, None].float()
    k = 2 * radius + 1
    hi = F.max_pool2d(x, k, stride=1, padding=radius)[0, 0]
    lo = -F.max_pool2d(-x, k, stride=1, padding=radius)[0, 0]
    return (hi == lo) & (mask != 255)


def test_full_augmentation_keeps_every_interior_pixel_aligned(coded):
    cfg = data_cfg(scale_range=(0.5, 2.0), crop_size=(32, 40), perspective=0.5)
    checked = total = 0
    for image, mask in outputs(augment.train_transform(cfg, coded.info), coded):
        assert image.shape == (3, 32, 40) and mask.shape == (32, 40)
        assert image.dtype == mask.dtype == torch.uint8 and type(image) is torch.Tensor
        inside = interior(mask)
        assert torch.equal(decode(image)[inside], mask[inside].long())
        checked, total = checked + int(inside.sum()), total + mask.numel()
    assert checked > 0.3 * total     # the check covers most of the pictures


def test_crop_pad_and_flip_keep_every_pixel_aligned_and_pad_with_ignore():
    # labels without ignore, a crop larger than the image in height and smaller in width
    mask = torch.randint(0, 4, (20, 30), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    dataset = palette_coded([mask])
    cfg = data_cfg(crop_size=(28, 24))
    fill = augment.mean_colour(dataset.info.mean)
    flipped = 0
    for image, out in outputs(augment.train_transform(cfg, dataset.info), dataset, draws=12):
        assert out.shape == (28, 24)
        rows = (out != 255).any(1).nonzero()[:, 0]
        top, bottom = int(rows[0]), int(rows[-1]) + 1
        assert bottom - top == 20                       # the whole height, padded 8 in all
        assert (out[:top] == 255).all() and (out[bottom:] == 255).all()
        assert (image[:, :top] == torch.tensor(fill).view(3, 1, 1)).all()
        window = out[top:bottom]
        assert torch.equal(decode(image[:, top:bottom]), window.long())   # colour = label
        # the window is 24 consecutive columns of the mask, mirrored or not
        starts = [x for x in range(7) if torch.equal(window, mask[:, x:x + 24])]
        mirrored = [x for x in range(7) if torch.equal(window, mask[:, x:x + 24].flip(-1))]
        assert starts or mirrored
        flipped += bool(mirrored) and not starts
    assert 2 <= flipped <= 10


@pytest.mark.parametrize("size", [(10, 12), (40, 30), (64, 80)])
def test_crop_size_is_exact_for_any_input_size(size):
    dataset = palette_coded([torch.zeros(size, dtype=torch.uint8)])
    cfg = data_cfg(scale_range=(0.5, 2.0), crop_size=(24, 36), perspective=0.3,
                   color_jitter=0.4)
    for image, mask in outputs(augment.train_transform(cfg, dataset.info), dataset, draws=6):
        assert image.shape == (3, 24, 36) and mask.shape == (24, 36)


def test_masks_are_resized_and_warped_with_nearest():
    # two labels far apart: any blending would create values in between
    mask = torch.zeros(30, 30, dtype=torch.uint8)
    mask[8:22, 5:25] = 200
    dataset = palette_coded([mask])
    cfg = data_cfg(resize=45, scale_range=(0.6, 1.7), crop_size=(30, 30), perspective=0.8)
    values = set()
    for _, out in outputs(augment.train_transform(cfg, dataset.info), dataset, draws=10):
        values |= set(out.unique().tolist())
    assert values == {0, 200, 255}


def test_random_scale_factor_and_sizes():
    dataset = palette_coded([torch.zeros(30, 41, dtype=torch.uint8)])
    (image, mask), = outputs(augment.train_transform(
        data_cfg(scale_range=(0.5, 0.5), hflip=False), dataset.info), dataset, draws=1)
    assert image.shape == (3, 15, 20) and mask.shape == (15, 20)   # round(20.5) = 20
    sizes = {tuple(m.shape) for _, m in outputs(augment.train_transform(
        data_cfg(scale_range=(0.5, 2.0)), dataset.info), dataset, draws=20)}
    heights = [h for h, _ in sizes]
    assert len(sizes) > 10 and 15 <= min(heights) and max(heights) <= 60


@pytest.mark.parametrize("hw, box, expected", [
    ((1024, 2048), (2048, 1024), (1024, 2048)),   # Cityscapes at its own box
    ((375, 500), (2048, 512), (512, 683)),        # a VOC image: short side to 512, 682.67 + 0.5
    ((512, 683), (512, 2048), (512, 683)),        # the box's order does not matter
    ((2000, 300), (2048, 512), (2048, 307)),      # the long side binds: 300 * 1.024 + 0.5
])
def test_fit_size_is_mmcvs_keep_ratio_rescale(hw, box, expected):
    assert augment.fit_size(*hw, box) == expected


def test_random_scale_with_a_box_fits_the_scaled_box():
    """mmsegmentation's RandomResize: ratio r scales the box (truncated to integers), then the
    image is resized, keeping its aspect, to fit the scaled box."""
    dataset = palette_coded([torch.zeros(30, 40, dtype=torch.uint8)])
    t = augment.train_transform(data_cfg(scale_range=(0.5, 2.0), scale_to=(100, 50),
                                         hflip=False), dataset.info)
    for seed in range(5):
        torch.manual_seed(seed)
        r = float(torch.empty(()).uniform_(0.5, 2.0))          # the transform's one draw
        torch.manual_seed(seed)
        image, mask = augment.apply(t, *dataset.read(0))
        f = min(int(100 * r) / 40, int(50 * r) / 30)
        assert mask.shape == (int(30 * f + 0.5), int(40 * f + 0.5)) == image.shape[1:]


def _balanced_share(max_ratio, seeds=200):
    """Class 1 fills the 8 left columns of a 16 x 64 mask and columns 8-9 are ignored. A
    16 x 16 crop starting at column c < 8 has 8 - c columns of class 1 and 6 + c of class 0
    among its 14 labelled ones: no class reaches 75% for c = 0-4, 5 of the 49 offsets."""
    mask = torch.zeros(16, 64, dtype=torch.uint8)
    mask[:, :8] = 1
    mask[:, 8:10] = 255
    dataset = palette_coded([mask])
    t = augment.train_transform(data_cfg(crop_size=(16, 16), crop_max_class_ratio=max_ratio,
                                         hflip=False), dataset.info)
    balanced = 0
    for seed in range(seeds):
        torch.manual_seed(seed)
        _, out = augment.apply(t, mask, mask)
        counts = torch.bincount(out[out != 255].long(), minlength=2)
        balanced += bool((counts > 0).all() and counts.max() < 0.75 * counts.sum())
    return balanced / seeds


def test_crop_is_redrawn_while_one_class_dominates():
    # balanced with probability 1 - (44/49)^11 = 0.694 after 10 redraws, 5/49 = 0.102 without;
    # over 200 draws the standard deviation is at most 0.035: 4 of them either way
    assert abs(_balanced_share(0.75) - 0.694) < 0.14
    assert abs(_balanced_share(1.0) - 0.102) < 0.14


def test_class_shares_leave_ignored_pixels_out():
    crop = augment.RandomCropMaxClass((4, 4), 0.75, ignore_index=255, fill=0)
    window = dict(top=0, left=0, height=4, width=4, padding=[0, 0, 0, 0])
    mask = torch.full((4, 4), 255, dtype=torch.uint8)
    mask[0, :] = 0
    mask[1, :2] = 0
    mask[1, 2:] = 1                  # 6 of class 0 and 2 of class 1 among 8 labelled pixels:
    assert not crop._balanced(mask, window)   # 0.75, not below it (with ignore it were 0.375)
    mask[1, 1] = 1                   # 5 and 3: 0.625
    assert crop._balanced(mask, window)
    mask[0:2] = 255                  # nothing labelled
    assert not crop._balanced(mask, window)


def test_crop_without_a_class_ratio_is_torchvisions_random_crop(coded):
    ours = augment.train_transform(data_cfg(crop_size=(24, 48), hflip=False), coded.info)
    fill = {tv_tensors.Image: augment.mean_colour(coded.info.mean), tv_tensors.Mask: 255}
    theirs = v2.RandomCrop((24, 48), pad_if_needed=True, fill=fill)
    for (a_image, a_mask), (b_image, b_mask) in zip(outputs(ours, coded), outputs(theirs, coded)):
        assert torch.equal(a_image, b_image) and torch.equal(a_mask, b_mask)


def test_photometric_changes_the_image_only(coded):
    t = augment.train_transform(data_cfg(hflip=False, photometric=True), coded.info)
    changed = 0
    for i, (image, mask) in enumerate(outputs(t, coded, draws=2)):
        assert torch.equal(mask, coded.read(i // 2)[1]) and image.dtype == torch.uint8
        changed += not torch.equal(image, coded.read(i // 2)[0])
    assert changed >= 8     # each of 4 steps at p = 0.5: unchanged with probability 1/16


def test_resize_sets_the_shorter_side_with_bilinear_images():
    image = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    mask = torch.randint(0, 3, (30, 50), dtype=torch.uint8)
    t = augment.train_transform(data_cfg(resize=24, hflip=False), palette_coded([]).info)
    out_image, out_mask = augment.apply(t, image, mask)
    assert torch.equal(out_image, TF.resize(image, [24, 40], antialias=True))
    assert torch.equal(out_mask, TF.resize(mask[None], [24, 40],
                                           interpolation=InterpolationMode.NEAREST)[0])


def test_colour_jitter_changes_the_image_only(coded):
    t = augment.train_transform(data_cfg(hflip=False, color_jitter=0.8), coded.info)
    changed = 0
    for i, (image, mask) in enumerate(outputs(t, coded, draws=2)):
        source_image, source_mask = coded.read(i // 2)
        assert torch.equal(mask, source_mask)
        changed += not torch.equal(image, source_image)
    assert 2 <= changed <= 11     # p = 0.5 over 12 draws


def test_perspective_fills_the_mask_with_ignore():
    dataset = palette_coded([torch.ones(32, 32, dtype=torch.uint8)])
    t = augment.train_transform(data_cfg(hflip=False, perspective=1.0), dataset.info)
    warped = [m for _, m in outputs(t, dataset, draws=8) if (m != 1).any()]
    assert warped and all(set(m.unique().tolist()) == {1, 255} for m in warped)


def test_default_config_is_flips_only(coded):
    image, mask = coded.read(0)
    seen = set()
    t = augment.train_transform(data_cfg(), coded.info)
    torch.manual_seed(0)
    for _ in range(12):
        out_image, out_mask = augment.apply(t, image, mask)
        same = torch.equal(out_image, image) and torch.equal(out_mask, mask)
        mirror = torch.equal(out_image, image.flip(-1)) and torch.equal(out_mask, mask.flip(-1))
        assert same or mirror
        seen.add(mirror)
    assert seen == {False, True}
    assert augment.train_transform(data_cfg(hflip=False), coded.info) is None


def test_eval_transform_is_resize_then_centre_crop():
    image = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    mask = torch.randint(0, 3, (30, 50), dtype=torch.uint8)
    info = palette_coded([]).info
    t = augment.eval_transform(data_cfg(resize=24, crop_size=(24, 24), scale_range=(0.5, 2.0),
                                        perspective=0.5, color_jitter=0.5), info)
    out_image, out_mask = augment.apply(t, image, mask)
    assert torch.equal(out_image, TF.center_crop(TF.resize(image, [24, 40], antialias=True),
                                                 [24, 24]))
    assert torch.equal(out_mask, TF.center_crop(TF.resize(
        mask[None], [24, 40], interpolation=InterpolationMode.NEAREST), [24, 24])[0])
    # whole images unless the resize preprocessing (data.resize) is asked for
    assert augment.eval_transform(data_cfg(crop_size=(24, 24), scale_range=(0.5, 2.0)),
                                  info) is None


def test_mean_colour_normalises_to_about_zero():
    dataset = palette_coded([], mean=(0.2, 0.5, 0.9), std=(0.1, 0.2, 0.3))
    assert augment.mean_colour(dataset.info.mean) == (51, 128, 230)


@pytest.mark.parametrize("overrides, match", [
    (dict(resize=-1), "data.resize=-1"),
    (dict(scale_range=(2.0, 0.5)), r"data.scale_range=\(2.0, 0.5\)"),
    (dict(scale_range=(0.0, 1.0)), "data.scale_range"),
    (dict(crop_size=(32,)), r"data.crop_size=\(32,\)"),
    (dict(crop_size=(0, 32)), "data.crop_size"),
    (dict(color_jitter=-0.1), "data.color_jitter=-0.1"),
    (dict(perspective=1.5), "data.perspective=1.5"),
    (dict(scale_to=(512,)), r"data.scale_to=\(512,\)"),
    (dict(scale_to=(0, 512)), r"data.scale_to"),
    (dict(crop_max_class_ratio=0.0), r"data.crop_max_class_ratio=0.0"),
])
def test_bad_config_is_one_line_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        augment.train_transform(data_cfg(**overrides), palette_coded([]).info)
