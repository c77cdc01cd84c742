"""The one interface every dataset split implements, synthetic or read from disk.

A split is a `torch.utils.data.Dataset` of raw, unaugmented samples:
  len(ds)              number of samples
  ds.read(i)           (image uint8 (3, H, W), mask uint8 (H, W)); sizes may differ per sample
  ds.source(i)         the file(s) behind sample i, for error messages ("" when generated)
  ds.info              DatasetInfo: class names, palette, ignore index, normalisation stats
Augmentation, batching and device transfer live in seg/data/augment.py and batches.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    ignore_index: int
    mean: tuple[float, float, float]     # per-channel, 0-1 scale (the train split's, or ImageNet's)
    std: tuple[float, float, float]
    palette: tuple[tuple[int, int, int], ...] = ()   # RGB per class, for prediction pictures

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SegDataset(torch.utils.data.Dataset):
    """Base class: subclasses set `info` and implement __len__, read and source."""

    info: DatasetInfo

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def source(self, i: int) -> str:
        return ""

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.read(i)
