"""Datasets: `build(config.data, split)` returns one split as a SegDataset (seg/data/dataset.py).

data.name: synthetic (generated, the default) | folder | camvid | voc | pets (read from
data.root, never downloaded). split "train" / "val" / "test" reads the dataset's split named by
data.train_split / val_split / test_split. Readers: folder.py (folder, camvid), voc.py, pets.py;
shared decoding and checks: files.py; memmap / hdf5 caches (data.storage): cache.py.
"""
from __future__ import annotations

from seg.data import cache, camvid, files, folder, pets, voc
from seg.data.dataset import DatasetInfo, SegDataset
from seg.data.files import DataError
from seg.data.synthetic import CLASS_NAMES, IGNORE_INDEX, generate

SPLITS = ("train", "val", "test")
READERS = {"folder": folder.open_folder, "camvid": camvid.open_camvid, "voc": voc.open_voc,
           "pets": pets.open_pets}
DATASETS = ("synthetic", *READERS)


def build(data_cfg, split: str) -> SegDataset:
    if data_cfg.name not in DATASETS:
        raise ValueError(f"data.name={data_cfg.name!r} is not one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if data_cfg.name == "synthetic":
        return _synthetic(data_cfg, split)
    ds = READERS[data_cfg.name](data_cfg, f"{split}_split")
    if data_cfg.verify:
        files.verify(ds)
    return cache.cached(ds, data_cfg, data_cfg[f"{split}_split"])


def _synthetic(data_cfg, split: str):
    """Reads data.{num_classes, image_size, seed, num_train, num_val, num_test, ignore_index}."""
    if data_cfg.ignore_index != IGNORE_INDEX:
        raise ValueError(f"data.ignore_index={data_cfg.ignore_index} must be {IGNORE_INDEX} "
                         f"for data.name='synthetic'")
    if data_cfg.get("storage", "raw") != "raw":
        raise ValueError(f"data.storage={data_cfg.storage!r} caches datasets read from files; "
                         f"data.name='synthetic' is generated in memory: use data.storage='raw'")
    if not 2 <= data_cfg.num_classes <= len(CLASS_NAMES):
        raise ValueError(f"data.num_classes={data_cfg.num_classes} but data.name='synthetic' has "
                         f"{len(CLASS_NAMES)} classes (2 to {len(CLASS_NAMES)} can be used)")
    sizes = {"train": data_cfg.num_train, "val": data_cfg.num_val, "test": data_cfg.num_test}
    return generate(split, sizes[split], image_size=data_cfg.image_size,
                    num_classes=data_cfg.num_classes, seed=data_cfg.seed)


__all__ = ["DATASETS", "DataError", "DatasetInfo", "SegDataset", "build"]
