"""seg.data.batches: deterministic, resumable, shardable train batches; padded eval batches."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from configs import common
from conftest import decode, palette_coded
from seg import metrics
from seg.data import batches, synthetic, augment
from seg.data.synthetic import SegmentationData


def _indexed_data(n=10, h=4, w=16) -> SegmentationData:
    """Channel 0 = 10 * column, channel 1 = image index; mask = column % 3 (255 on row 0).
    Identity normalisation, so batches decode back to the uint8 values."""
    x = torch.arange(w, dtype=torch.uint8)
    images = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    images[:, 0] = 10 * x
    images[:, 1] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)
    masks = (x % 3).expand(n, h, w).clone()
    masks[:, 0] = 255
    return SegmentationData(images, masks, ("a", "b", "c"), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 255)


def _decode(images):
    return (images * 255).round().to(torch.uint8)


def _raw(images):
    """Undoes palette_coded's normalisation (mean 0.5, std 0.25)."""
    return (images * 0.25 + 0.5).mul(255).round().to(torch.uint8)


def _cfg(**overrides):
    c = common.get_base_config().data
    c.update(overrides)
    return c


FLIP = _cfg()     # the default: flips only


def _train(data, batch_size, seed=0, steps=4, cfg=FLIP, **kwargs):
    transform = augment.train_transform(cfg, data.info)
    return list(itertools.islice(batches.train_batches(data, transform, batch_size, seed, **kwargs),
                                 steps))


def _assert_same(a, b):
    assert len(a) == len(b)
    for (x, y), (u, v) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v)


@pytest.fixture(scope="module")
def scenes():
    return synthetic.generate("train", 12, (24, 32), num_classes=3)


AUGMENT = _cfg(scale_range=(0.5, 2.0), crop_size=(20, 24), color_jitter=0.4, perspective=0.3)


# ---------------------------------------------------------------- train batches

def test_batches_have_the_right_types_and_keep_the_ignore_label():
    images, masks = _train(_indexed_data(), 4, steps=1)[0]
    assert images.dtype == torch.float32 and images.shape == (4, 3, 4, 16)
    assert masks.dtype == torch.int64 and masks.shape == (4, 4, 16)
    assert (masks[:, 0] == 255).all()


def test_each_epoch_visits_every_image_once_in_a_new_order():
    got = _train(_indexed_data(n=10), 3, steps=12, cfg=_cfg(hflip=False))
    ids = torch.stack([_decode(images)[:, 1, 0, 0] for images, _ in got]).view(4, 9)
    for epoch in ids:     # 3 full batches per epoch; the 10th image is dropped
        assert len(set(epoch.tolist())) == 9
    assert len({tuple(epoch.tolist()) for epoch in ids}) == 4
    assert len({tuple(sorted(epoch.tolist())) for epoch in ids}) > 1   # the dropped one varies


def test_flips_keep_image_and_mask_aligned():
    flipped = 0
    for images, masks in _train(_indexed_data(), 5, steps=20):
        column = _decode(images)[:, 0].long() // 10            # (B, H, W) source column
        assert torch.equal(masks[:, 1:], column[:, 1:] % 3)
        assert (masks[:, 0] == 255).all()
        mirrored = column[:, 0, 0] == 15
        assert torch.equal(column, torch.where(mirrored.view(-1, 1, 1), 15 - torch.arange(16),
                                               torch.arange(16)).expand_as(column))
        flipped += int(mirrored.sum())
    assert 25 <= flipped <= 75     # about half of 100 samples


def test_augmented_batches_keep_colour_and_label_aligned():
    coded = palette_coded(synthetic.generate("val", 8, (24, 32), num_classes=3).masks)
    for images, masks in _train(coded, 4, steps=4, cfg=_cfg(scale_range=(0.7, 1.5),
                                                            crop_size=(20, 24))):
        # away from label boundaries (and ignore), the colour decodes to the label
        x = masks[:, None].float()
        far = (F.max_pool2d(x, 5, 1, 2) == -F.max_pool2d(-x, 5, 1, 2))[:, 0] & (masks != 255)
        assert torch.equal(decode(_raw(images))[far], masks[far])
        assert far.sum() > 0.3 * masks.numel()


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_is_the_tail_of_the_full_one(scenes, workers):
    torch.manual_seed(0)
    full = _train(scenes, 4, seed=7, steps=7, cfg=AUGMENT)
    torch.manual_seed(1)    # the global RNG must play no part
    resumed = _train(scenes, 4, seed=7, steps=3, cfg=AUGMENT, start_step=4, workers=workers)
    _assert_same(full[4:], resumed)
    other = _train(scenes, 4, seed=8, steps=1, cfg=AUGMENT, start_step=4)
    assert not torch.equal(other[0][0], full[4][0])


def test_batches_do_not_depend_on_the_number_of_workers(scenes):
    _assert_same(_train(scenes, 4, steps=5, cfg=AUGMENT),
                 _train(scenes, 4, steps=5, cfg=AUGMENT, workers=2))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_global_rng_is_left_alone(scenes, workers):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    _train(scenes, 4, steps=3, cfg=AUGMENT, workers=workers)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_make_up_the_single_process_batch(scenes, world_size):
    single = _train(scenes, 8, steps=3, cfg=AUGMENT)
    ranks = [_train(scenes, 8, steps=3, cfg=AUGMENT, rank=r, world_size=world_size)
             for r in range(world_size)]
    for step, (images, masks) in enumerate(single):
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), images)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), masks)


def test_prefetch_depth_does_not_change_the_stream(scenes):
    _assert_same(_train(scenes, 4, steps=4, cfg=AUGMENT, prefetch=0),
                 _train(scenes, 4, steps=4, cfg=AUGMENT, prefetch=3))


def test_uncropped_samples_of_different_sizes_are_refused():
    coded = palette_coded([torch.zeros(8, 8, dtype=torch.uint8),
                           torch.zeros(8, 9, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="data.crop_size"):
        _train(coded, 2, steps=1)


def test_bad_samples_name_their_source():
    coded = palette_coded([torch.zeros(8, 8, dtype=torch.uint8)])
    coded.pairs[0] = (coded.pairs[0][0], torch.zeros(8, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sample 0 \\(pair0\\)"):
        _train(coded, 1, steps=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=13), "batch_size=13"),
    (dict(start_step=-1), "start_step=-1"),
    (dict(batch_size=6, world_size=4), "batch_size=6 is not divisible by world_size=4"),
    (dict(rank=2, world_size=2), "rank=2"),
    (dict(workers=-1), "data.workers=-1"),
    (dict(prefetch=-1), "data.prefetch=-1"),
])
def test_train_batches_reject_bad_arguments(scenes, kwargs, match):
    args = dict(batch_size=4) | kwargs
    with pytest.raises(ValueError, match=match):
        next(batches.train_batches(scenes, None, seed=0, **args))


# ---------------------------------------------------------------- eval batches

def test_eval_batches_cover_the_split_in_order(scenes):
    found = list(batches.eval_batches(scenes, None, 5, pad_multiple=8))
    assert [len(m) for _, m in found] == [5, 5, 2]
    images = torch.cat([i for i, _ in found])
    masks = torch.cat([m for _, m in found])
    assert torch.equal(images, batches.normalize(scenes.images, scenes.mean, scenes.std))
    assert torch.equal(masks, scenes.masks.long())


@pytest.fixture(scope="module")
def mixed():
    """Colour-coded samples of five different sizes."""
    g = torch.Generator().manual_seed(0)
    sizes = [(20, 30), (33, 17), (8, 40), (32, 32), (25, 26)]
    return palette_coded([torch.randint(0, 4, s, generator=g, dtype=torch.uint8) for s in sizes])


def _per_image(found):
    """The padded (image, mask) of every sample, in the split's order."""
    return [(images[k], masks[k]) for images, masks in found for k in range(len(masks))]


def test_eval_pads_each_image_to_a_multiple_with_ignore_and_the_mean_colour(mixed):
    found = list(batches.eval_batches(mixed, None, 3, pad_multiple=16))
    # sizes (20, 30), (33, 17), (8, 40) | (32, 32), (25, 26) read 3 at a time; each padded to
    # its own size rounded up to 16, and those of one padded size batched together
    assert [tuple(m.shape) for _, m in found] == [(1, 32, 32), (1, 48, 32), (1, 16, 48),
                                                  (2, 32, 32)]
    for (image, mask), (got_image, got_mask) in zip(mixed.pairs, _per_image(found)):
        h, w = mask.shape
        assert got_mask.shape == (-(-h // 16) * 16, -(-w // 16) * 16)
        assert torch.equal(got_mask[:h, :w], mask.long())
        assert torch.equal(got_image[:, :h, :w],
                           batches.normalize(image, mixed.info.mean, mixed.info.std))
        pad = torch.ones(got_mask.shape, dtype=torch.bool)
        pad[:h, :w] = False
        assert (got_mask[pad] == 255).all()
        # the mean colour: ~0 once normalised (within half a grey level); (32, 32) has no padding
        assert not pad.any() or got_image[:, pad].abs().max() <= 0.5 / 255 / 0.25 + 1e-6


def test_what_the_network_sees_of_an_image_does_not_depend_on_the_batch_size(mixed):
    def seen(batch_size):  # every padded sample, in an order that does not depend on batching
        found = _per_image(batches.eval_batches(mixed, None, batch_size, pad_multiple=16))
        return sorted(found, key=lambda pair: pair[1].numpy().tobytes())

    one = seen(1)
    for batch_size in (2, 5, 7):
        for (a, ma), (b, mb) in zip(one, seen(batch_size), strict=True):
            assert torch.equal(a, b) and torch.equal(ma, mb)


def test_padded_eval_counts_exactly_the_unpadded_pixels(mixed):
    """An identity 'model' (colour -> label): the confusion matrix over padded batches equals
    the per-image, unpadded one; padding with a class instead of ignore would add pixels."""
    padded = sum(metrics.confusion_matrix(decode(_raw(images)), masks, 4)
                 for images, masks in batches.eval_batches(mixed, None, 2, pad_multiple=32))
    unpadded = sum(metrics.confusion_matrix(decode(image)[None], mask[None].long(), 4)
                   for image, mask in mixed.pairs)
    assert torch.equal(padded, unpadded) and unpadded.sum() == sum(
        m.numel() for _, m in mixed.pairs)


def test_eval_applies_the_transform_and_workers_change_nothing(mixed):
    t = augment.eval_transform(_cfg(resize=24, crop_size=(24, 24)), mixed.info)
    single = list(batches.eval_batches(mixed, t, 2, pad_multiple=8))
    assert all(images.shape[-2:] == (24, 24) for images, _ in single)
    _assert_same(single, list(batches.eval_batches(mixed, t, 2, pad_multiple=8, workers=2)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_shards_cover_the_split_once_in_order(scenes, world_size):
    whole = torch.cat([m for _, m in batches.eval_batches(scenes, None, 4)])
    shards = [torch.cat([m for _, m in batches.eval_batches(scenes, None, 4, rank=r,
                                                            world_size=world_size)])
              for r in range(world_size)]
    assert torch.equal(torch.cat(shards), whole)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(pad_multiple=0), "data.pad_multiple=0"),
    (dict(rank=-1), "rank=-1"),
])
def test_eval_batches_reject_bad_arguments(scenes, kwargs, match):
    args = dict(batch_size=4) | kwargs
    with pytest.raises(ValueError, match=match):
        next(batches.eval_batches(scenes, None, **args))


# ---------------------------------------------------------------- normalize

def test_normalize_matches_torchvision(scenes):
    expected = TF.normalize(TF.to_dtype(scenes.images, torch.float32, scale=True),
                            list(scenes.mean), list(scenes.std))
    got = batches.normalize(scenes.images, scenes.mean, scenes.std)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)     # same operations in the same order: bitwise equal
    with pytest.raises(ValueError, match="images_uint8.dtype=torch.float32"):
        batches.normalize(scenes.images.float(), scenes.mean, scenes.std)
