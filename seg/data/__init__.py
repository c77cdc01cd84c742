"""Datasets: `build(config.data, split)` returns one split as a SegDataset (seg/data/dataset.py);
`build_splits(config.data)` every split a run uses, each with its augmentation.

data.name: synthetic (generated, the default) | folder | camvid | voc | pets | cityscapes |
ade20k (read from data.root or $SEG_DATASETS/<data.dirname> (roots.py), never downloaded).
split "train" / "val" / "test" reads the dataset's split named by data.train_split / val_split /
test_split. Readers: folder.py (folder, camvid), voc.py, pets.py, cityscapes.py, ade20k.py;
stored label values -> classes: labels.py; shared decoding and checks: files.py; memmap / hdf5
caches (data.storage): cache.py.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

from seg.data import ade20k, augment, cache, camvid, cityscapes, files, folder, pets, roots, voc
from seg.data.dataset import DatasetInfo, SegDataset
from seg.data.files import DataError
from seg.data.synthetic import CLASS_NAMES, IGNORE_INDEX, generate

SPLITS = ("train", "val", "test")
READERS = {"folder": folder.open_folder, "camvid": camvid.open_camvid, "voc": voc.open_voc,
           "pets": pets.open_pets, "cityscapes": cityscapes.open_cityscapes,
           "ade20k": ade20k.open_ade20k}
DATASETS = ("synthetic", *READERS)


def build(data_cfg, split: str) -> SegDataset:
    if data_cfg.name not in DATASETS:
        raise ValueError(f"data.name={data_cfg.name!r} is not one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if data_cfg.name == "synthetic":
        return _synthetic(data_cfg, split)
    if data_cfg.name != "folder" and (data_cfg.get("reduce_zero_label")
                                      or data_cfg.get("label_map")):
        raise ValueError(f"data.reduce_zero_label / data.label_map apply to data.name='folder'; "
                         f"the {data_cfg.name} reader maps its own label values")
    ds = READERS[data_cfg.name](data_cfg, f"{split}_split")
    if data_cfg.verify:
        files.verify(ds)
    return cache.cached(ds, data_cfg, data_cfg[f"{split}_split"])


class Split(NamedTuple):
    dataset: SegDataset
    transform: Callable | None   # seg.data.augment's train or eval transform; None: none


def build_splits(data_cfg) -> dict[str, Split]:
    """{"train", "val"[, "test"]: Split}; the test split is left out when data.test_split is "",
    or, with data.test_optional, when the dataset's folder has no such split (with a warning).
    The dataset must have data.num_classes classes."""
    for field in ("train_split", "val_split"):
        if not data_cfg[field]:
            raise ValueError(f"data.{field} is empty: training needs it")
    splits = {}
    for role in SPLITS:
        if data_cfg[f"{role}_split"]:
            try:
                dataset = build(data_cfg, role)
            except roots.MissingSplit as e:
                if role != "test" or not data_cfg.get("test_optional", False):
                    raise
                warnings.warn(f"no test split, so no test evaluation (data.test_optional): {e}")
                continue
            make = augment.train_transform if role == "train" else augment.eval_transform
            splits[role] = Split(dataset, make(data_cfg, dataset.info))
    info = splits["train"].dataset.info
    if info.num_classes != data_cfg.num_classes:
        raise DataError(f"data.num_classes={data_cfg.num_classes} but the {data_cfg.name} "
                        f"dataset has {info.num_classes} classes ({', '.join(info.class_names)})")
    return splits


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
    _check_crop(data_cfg)
    sizes = {"train": data_cfg.num_train, "val": data_cfg.num_val, "test": data_cfg.num_test}
    return generate(split, sizes[split], image_size=data_cfg.image_size,
                    num_classes=data_cfg.num_classes, seed=data_cfg.seed)


def _check_crop(data_cfg) -> None:
    """Real images vary in size and get padded up to the crop; generated ones all have
    data.image_size, so a crop larger than they can be is a mistake."""
    crop = tuple(data_cfg.get("crop_size", ()))
    if len(crop) != 2:  # () is no crop; other lengths are seg.data.augment's to report
        return
    size = data_cfg.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scale = max(data_cfg.get("scale_range", (1.0, 1.0)))
    if crop[0] > h * scale or crop[1] > w * scale:
        raise ValueError(f"data.crop_size={crop} is larger than the images: data.image_size="
                         f"{size} rescaled by at most {scale} (data.scale_range)")


__all__ = ["DATASETS", "DataError", "DatasetInfo", "SegDataset", "Split", "build",
           "build_splits"]
