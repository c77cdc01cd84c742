from __future__ import annotations

import dataclasses
import itertools

import ml_collections
import pytest
import torch

from seg import data as data_lib
from seg.data import synthetic
from seg.data.dataset import SegDataset
from seg.data.synthetic import SegmentationData, generate, ignore_band

SIZE = 48


@pytest.fixture(scope="module")
def train3():
    return generate("train", 32, SIZE, num_classes=3, seed=0)


# ---------------------------------------------------------------- synthetic: determinism

def test_same_seed_gives_identical_tensors(train3):
    torch.manual_seed(123)   # the global RNG must play no part
    again = generate("train", 32, SIZE, num_classes=3, seed=0)
    assert torch.equal(again.images, train3.images) and torch.equal(again.masks, train3.masks)
    assert (again.mean, again.std) == (train3.mean, train3.std)


@pytest.mark.parametrize("split, seed", [("train", 1), ("val", 0), ("test", 0)])
def test_other_seed_or_split_gives_other_images(train3, split, seed):
    other = generate(split, 32, SIZE, num_classes=3, seed=seed)
    assert (other.images != train3.images).float().mean() > 0.5
    assert not torch.equal(other.masks, train3.masks)


def test_val_and_test_differ():
    val, test = generate("val", 8, SIZE, seed=0), generate("test", 8, SIZE, seed=0)
    assert (val.images != test.images).float().mean() > 0.5


def test_image_i_does_not_depend_on_split_size(train3):
    longer = generate("train", 45, SIZE, num_classes=3, seed=0)
    assert torch.equal(longer.images[:32], train3.images)
    assert torch.equal(longer.masks[:32], train3.masks)


def test_mean_std_are_the_train_statistics_for_every_split():
    reference = generate("train", 256, 16, seed=3)
    x = reference.images.double() / 255
    assert reference.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert reference.std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    for split in ("train", "val", "test"):
        small = generate(split, 4, 16, seed=3)
        assert small.mean == pytest.approx(reference.mean, abs=1e-12)
        assert small.std == pytest.approx(reference.std, abs=1e-12)


# ---------------------------------------------------------------- synthetic: content

@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_mask_values_and_every_class_present(num_classes):
    d = generate("val", 32, SIZE, num_classes=num_classes, seed=0)
    assert d.images.shape == (32, 3, SIZE, SIZE) and d.images.dtype == torch.uint8
    assert d.masks.shape == (32, SIZE, SIZE) and d.masks.dtype == torch.uint8
    values = set(d.masks.unique().tolist())
    assert values == set(range(num_classes)) | {255}
    assert d.class_names == synthetic.CLASS_NAMES[:num_classes] and d.ignore_index == 255


def test_rectangular_images():
    d = generate("train", 4, (32, 48), seed=0)
    assert d.images.shape == (4, 3, 32, 48) and d.masks.shape == (4, 32, 48)


def test_objects_are_a_sizeable_part_of_the_pixels(train3):
    fraction = torch.bincount(train3.masks.flatten().long(), minlength=256).double()
    fraction /= fraction.sum()
    assert 0.55 < fraction[0] < 0.85
    assert fraction[1] > 0.04 and fraction[2] > 0.04
    assert 0.02 < fraction[255] < 0.15


def test_ignore_band_hand_example():
    labels = torch.zeros(1, 6, 7, dtype=torch.uint8)
    labels[0, 2:4, 2:4] = 1
    labels[0, :, 6] = 2     # a label change on the last column only; the frame is no boundary
    expected = torch.tensor([
        [0, 0, 0, 0, 0, 255, 255],
        [0, 255, 255, 255, 255, 255, 255],
        [0, 255, 255, 255, 255, 255, 255],
        [0, 255, 255, 255, 255, 255, 255],
        [0, 255, 255, 255, 255, 255, 255],
        [0, 0, 0, 0, 0, 255, 255]], dtype=torch.uint8)
    assert torch.equal(ignore_band(labels, 1)[0], expected)
    assert torch.equal(ignore_band(labels, 0), labels)


def _naive_band(labels: torch.Tensor, border: int) -> torch.Tensor:
    """255 where some pixel within Chebyshev distance `border` has another label."""
    n, h, w = labels.shape
    changed = torch.zeros(n, h, w, dtype=torch.bool)
    for dy, dx in itertools.product(range(-border, border + 1), repeat=2):
        ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
        xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
        changed[:, yd, xd] |= labels[:, ys, xs] != labels[:, yd, xd]
    return torch.where(changed, 255, labels)


@pytest.mark.parametrize("border", [1, 2])
def test_ignore_band_is_exactly_the_label_boundaries(train3, border):
    raw = generate("train", 32, SIZE, num_classes=3, seed=0, border=0)
    assert 255 not in raw.masks.unique()
    assert torch.equal(raw.images, train3.images)     # the band does not change the draws
    banded = train3 if border == 1 else generate("train", 32, SIZE, seed=0, border=border)
    assert torch.equal(banded.masks, _naive_band(raw.masks, border))


def _colour_lut_probe(fit: SegmentationData, evaluate: SegmentationData, classes, bins=8):
    """Balanced accuracy on `evaluate` of the best per-pixel colour lookup table fitted on `fit`
    (each colour bin predicts the class whose pixels fall into it most often, per class size)."""
    def pixels(d):
        q = (d.images.long() * bins // 256).permute(1, 0, 2, 3).reshape(3, -1)
        colour, label = (q[0] * bins + q[1]) * bins + q[2], d.masks.flatten().long()
        keep = (label[:, None] == torch.tensor(classes)).any(1)
        return colour[keep], label[keep]
    colour, label = pixels(fit)
    counts = torch.zeros(bins ** 3, 256)
    counts.index_put_((colour, label), torch.ones(len(label)), accumulate=True)
    table = (counts[:, classes] / counts[:, classes].sum(0)).argmax(1)
    colour, label = pixels(evaluate)
    predicted = torch.tensor(classes)[table[colour]]
    return sum(float((predicted[label == c] == c).float().mean()) for c in classes) / len(classes)


@pytest.fixture(scope="module")
def colour_splits():
    return (generate("train", 192, 32, num_classes=3, seed=0),
            generate("val", 192, 32, num_classes=3, seed=0))


def test_colour_carries_no_class_information(colour_splits):
    fit, held_out = colour_splits
    means = [fit.images.permute(1, 0, 2, 3)[:, fit.masks == c].double().mean(1) / 255
             for c in (0, 1, 2)]
    assert (means[1] - means[2]).abs().max() < 0.06
    assert (means[0] - means[1]).abs().max() < 0.06
    assert _colour_lut_probe(fit, held_out, [1, 2]) < 0.56       # chance: 0.5
    assert _colour_lut_probe(fit, held_out, [0, 1, 2]) < 0.42    # chance: 0.333


def test_colour_probe_detects_a_colour_cue(colour_splits):
    # the probe has power: tint class 1 red and it separates the classes
    def tinted(d):
        images = d.images.clone()
        images[:, 0][d.masks == 1] = 255
        return dataclasses.replace(d, images=images)
    fit, held_out = colour_splits
    assert _colour_lut_probe(tinted(fit), tinted(held_out), [1, 2]) > 0.75


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="training"), "split='training'"),
    (dict(num_classes=1), "num_classes=1"),
    (dict(num_classes=6), "num_classes=6"),
    (dict(image_size=8), "image_size=8"),
    (dict(num_images=-1), "num_images=-1"),
    (dict(border=-1), "border=-1"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    args = dict(split="train", num_images=2, image_size=32, num_classes=3, border=1) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(**args)


# ---------------------------------------------------------------- build

def _data_cfg(**overrides):
    c = ml_collections.ConfigDict(dict(
        name="synthetic", num_classes=3, image_size=SIZE, seed=0, num_train=32, num_val=5,
        num_test=6, ignore_index=255))
    c.update(overrides)
    return c


def test_build_dispatches_to_synthetic(train3):
    built = data_lib.build(_data_cfg(), "train")
    assert torch.equal(built.images, train3.images) and torch.equal(built.masks, train3.masks)
    assert data_lib.build(_data_cfg(), "val").images.shape[0] == 5
    assert data_lib.build(_data_cfg(), "test").images.shape[0] == 6


@pytest.mark.parametrize("overrides, split, match", [
    (dict(name="voc"), "train", "data.name='voc'"),
    (dict(ignore_index=0), "train", "data.ignore_index=0"),
    ({}, "dev", "split='dev'"),
])
def test_build_rejects_bad_config(overrides, split, match):
    with pytest.raises(ValueError, match=match):
        data_lib.build(_data_cfg(**overrides), split)


def test_synthetic_split_is_a_seg_dataset(train3):
    assert isinstance(train3, SegDataset) and len(train3) == 32
    image, mask = train3.read(5)
    assert torch.equal(image, train3.images[5]) and torch.equal(mask, train3.masks[5])
    assert train3.source(5) == ""
    info = train3.info
    assert (info.name, info.class_names, info.ignore_index) == ("synthetic",
                                                                synthetic.CLASS_NAMES[:3], 255)
    assert (info.mean, info.std, info.num_classes) == (train3.mean, train3.std, 3)
    assert len(info.palette) == 3 and len(set(info.palette)) == 3
