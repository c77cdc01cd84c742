"""Datasets: `build(config.data, split)` returns a whole split in memory as SegmentationData."""
from __future__ import annotations

from seg.data.synthetic import CLASS_NAMES, IGNORE_INDEX, SegmentationData, generate

DATASETS = ("synthetic",)


def build(data_cfg, split: str) -> SegmentationData:
    """Reads data.{name, num_classes, image_size, seed, num_train, num_val, num_test,
    ignore_index}."""
    if data_cfg.name not in DATASETS:
        raise ValueError(f"data.name={data_cfg.name!r} is not one of {DATASETS}")
    if data_cfg.ignore_index != IGNORE_INDEX:
        raise ValueError(f"data.ignore_index={data_cfg.ignore_index} must be {IGNORE_INDEX} "
                         f"for data.name='synthetic'")
    if not 2 <= data_cfg.num_classes <= len(CLASS_NAMES):
        raise ValueError(f"data.num_classes={data_cfg.num_classes} but data.name='synthetic' has "
                         f"{len(CLASS_NAMES)} classes (2 to {len(CLASS_NAMES)} can be used)")
    sizes = {"train": data_cfg.num_train, "val": data_cfg.num_val, "test": data_cfg.num_test}
    if split not in sizes:
        raise ValueError(f"split={split!r} is not one of {tuple(sizes)}")
    return generate(split, sizes[split], image_size=data_cfg.image_size,
                    num_classes=data_cfg.num_classes, seed=data_cfg.seed)
