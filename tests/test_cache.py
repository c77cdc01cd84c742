"""memmap / hdf5 caches: bit-for-bit equal to the raw reader, reused, rebuilt when stale."""
from __future__ import annotations

import sys
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import common
from seg import data
from seg.data import cache
from seg.data.files import PairedFiles

H, W = 8, 12


def _write(root: Path, stems=("a", "b", "c"), size=(H, W)):
    rng = np.random.default_rng(0)
    for stem in stems:
        (root / "train/images").mkdir(parents=True, exist_ok=True)
        (root / "train/masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / f"train/images/{stem}.png")
        Image.fromarray(rng.integers(0, 2, size, dtype=np.uint8)).save(
            root / f"train/masks/{stem}.png")


@pytest.fixture
def root(tmp_path):
    _write(tmp_path / "ds")
    return tmp_path / "ds"


def cfg(root: Path, **fields):
    c = common.get_base_config().data
    c.update(dict(name="folder", root=str(root), num_classes=2, normalize="imagenet",
                  storage="memmap", cache_dir=str(root.parent / "cache")) | fields)
    return c


def samples(ds):
    return [ds.read(i) for i in range(len(ds))]


def assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ma), (ib, mb) in zip(a, b):
        assert ia.dtype == ib.dtype == ma.dtype == mb.dtype == torch.uint8
        assert torch.equal(ia, ib) and torch.equal(ma, mb)


def test_memmap_cache_equals_raw_bit_for_bit(root):
    raw = data.build(cfg(root, storage="raw"), "train")
    cached = data.build(cfg(root), "train")
    assert isinstance(cached, cache.CachedSplit) and cached.info == raw.info
    assert_same(samples(cached), samples(raw))
    assert cached.source(1).endswith(f"[1] (from {raw.source(1)})")
    entries = os.listdir(root.parent / "cache")
    assert len(entries) == 1 and entries[0].startswith("ds-train-")   # no temporary left
    assert sorted(os.listdir(root.parent / "cache" / entries[0])) == \
        ["images.npy", "masks.npy", "meta.json"]


def test_cache_is_reused_without_reading_the_files(root, monkeypatch):
    first = samples(data.build(cfg(root), "train"))

    def no_reads(self, i):
        raise AssertionError("the cache was rebuilt")
    monkeypatch.setattr(PairedFiles, "read", no_reads)
    assert_same(samples(data.build(cfg(root), "train")), first)


def test_changed_source_file_rebuilds_the_cache(root):
    old = samples(data.build(cfg(root), "train"))
    Image.fromarray(np.ones((H, W), np.uint8)).save(root / "train/masks/b.png")
    fresh = data.build(cfg(root), "train")
    assert_same(samples(fresh), samples(data.build(cfg(root, storage="raw"), "train")))
    assert not torch.equal(fresh.read(1)[1], old[1][1])


@pytest.mark.parametrize("damage", ["delete_meta", "truncate_meta", "other_meta"])
def test_partial_or_foreign_cache_is_rebuilt_not_misread(root, damage):
    data.build(cfg(root), "train")
    cache = next((root.parent / "cache").iterdir())
    meta = cache / "meta.json"
    if damage == "delete_meta":
        meta.unlink()
    elif damage == "truncate_meta":
        meta.write_text(meta.read_text()[:20])
    else:
        meta.write_text(meta.read_text().replace('"count": 3', '"count": 2'))
    (cache / "masks.npy").write_bytes(b"garbage")
    assert_same(samples(data.build(cfg(root), "train")),
                samples(data.build(cfg(root, storage="raw"), "train")))


def test_preprocessing_is_part_of_the_key(root):
    native = data.build(cfg(root), "train")
    small = data.build(cfg(root, resize=4), "train")
    assert native.path != small.path and native.read(0)[0].shape == (3, H, W)
    image, mask = small.read(0)
    raw_image, raw_mask = data.build(cfg(root, storage="raw"), "train").read(0)
    # shorter side 8 -> 4 halves the width 12 -> 6; nearest keeps every other pixel; the centre
    # 4x4 crop drops one column each side
    assert torch.equal(mask, raw_mask[::2, ::2][:, 1:5])
    ref = torch.nn.functional.interpolate(raw_image[None].float(), size=(4, 6), mode="bilinear",
                                          antialias=True, align_corners=False)[0, :, :, 1:5]
    assert image.shape == (3, 4, 4) and (image.float() - ref).abs().max() <= 1


def test_mixed_sizes_need_a_resize(root):
    _write(root, stems=("d",), size=(H + 2, W))
    with pytest.raises(data.DataError, match=r"train/images/d.png.* is \(10, 12\) after "
                                             r"preprocessing but .*a.png.* is \(8, 12\).*"
                                             r"data.resize"):
        data.build(cfg(root), "train")
    assert os.listdir(root.parent / "cache") == []   # the partial cache was removed
    assert data.build(cfg(root, resize=6), "train").read(3)[1].shape == (6, 6)


def test_pickled_cache_carries_no_array_and_reopens(root):
    cached = data.build(cfg(root), "train")
    cached.read(0)
    blob = pickle.dumps(cached)
    assert len(blob) < 4000   # the images stay on disk
    assert_same(samples(pickle.loads(blob)), samples(cached))


def test_hdf5_without_h5py_says_what_to_install(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)   # import now fails as if not installed
    with pytest.raises(data.DataError, match=r"data.storage='hdf5' needs h5py.*pip install h5py"):
        data.build(cfg(root, storage="hdf5"), "train")


def test_hdf5_cache_equals_raw_bit_for_bit(root):
    cached = data.build(cfg(root, storage="hdf5"), "train")
    assert cached.path.endswith(".h5")
    assert_same(samples(cached), samples(data.build(cfg(root, storage="raw"), "train")))


@pytest.mark.parametrize("fields, match", [
    (dict(storage="lmdb"), "data.storage='lmdb' is not one of"),
    (dict(cache_dir=""), "data.storage='memmap' needs data.cache_dir"),
])
def test_bad_storage_config_names_the_field(root, fields, match):
    with pytest.raises(data.DataError, match=match):
        data.build(cfg(root, **fields), "train")


def test_synthetic_data_refuses_a_cache():
    c = common.get_base_config().data
    c.storage = "memmap"
    with pytest.raises(ValueError, match="data.storage='memmap'.*synthetic"):
        data.build(c, "train")


def test_cache_reads_in_dataloader_workers(root):
    cached = data.build(cfg(root), "train")
    cached.read(0)   # opened in this process: the workers must open their own
    loader = torch.utils.data.DataLoader(cached, batch_size=3, num_workers=1)
    images, masks = next(iter(loader))
    raw = samples(data.build(cfg(root, storage="raw"), "train"))
    assert torch.equal(images, torch.stack([s[0] for s in raw]))
    assert torch.equal(masks, torch.stack([s[1] for s in raw]))
