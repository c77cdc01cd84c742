"""Stored mask values -> class indices, as the two 256-entry tables a PairedFiles reads with:
`allowed` (bool: which stored values may appear) and `lut` (uint8: the class index, or the
ignore index, of each stored value).

Three ways a dataset stores its labels as PNG values:
  identity            the value is the class index (the folder layout's default)
  reduce_zero_label   0 is "other" (ignored) and value k is class k - 1 (ADE20K; the name is
                      mmsegmentation's LoadAnnotations option)
  a value table       each listed value -> its class or the ignore index (Cityscapes' label ids)
The stored ignore index stays the ignore index in every scheme.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from seg.data.files import value_table


class LabelTables(NamedTuple):
    allowed: Tensor            # (256,) bool
    lut: Tensor                # (256,) uint8
    expected: str              # what the allowed values are, for the error naming a bad file


def reduce_zero_label(num_classes: int, ignore_index: int) -> LabelTables:
    """0 -> ignore, k -> k - 1 for k in 1..num_classes, ignore -> ignore."""
    if not 1 <= num_classes <= 255:
        raise ValueError(f"reduce_zero_label needs 1 to 255 classes, got {num_classes}")
    lut = torch.full((256,), ignore_index, dtype=torch.uint8)
    lut[1:num_classes + 1] = torch.arange(num_classes, dtype=torch.uint8)
    lut[ignore_index] = ignore_index
    allowed = value_table([*range(num_classes + 1), ignore_index])
    return LabelTables(allowed, lut, f"0 (ignored) and 1-{num_classes} (classes 0-"
                                     f"{num_classes - 1}) with data.reduce_zero_label, and the "
                                     f"ignore index {ignore_index}")


def value_map(pairs: Sequence[Sequence[int]], num_classes: int, ignore_index: int,
              field: str = "data.label_map") -> LabelTables:
    """Each (stored value, class) pair of `pairs`; the class is in [0, num_classes) or the
    ignore index. Values not listed (other than the ignore index) are not allowed."""
    lut = torch.full((256,), ignore_index, dtype=torch.uint8)
    seen: set[int] = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{field}: {tuple(pair)} is not a (stored value, class) pair")
        value, cls = (int(v) for v in pair)
        if not 0 <= value <= 255 or value in seen:
            raise ValueError(f"{field}: stored value {value} is outside 0-255 or listed twice")
        if not (0 <= cls < num_classes or cls == ignore_index):
            raise ValueError(f"{field}: value {value} -> {cls}, which is neither a class in "
                             f"[0, {num_classes}) nor the ignore index {ignore_index}")
        seen.add(value)
        lut[value] = cls
    if not seen:
        raise ValueError(f"{field} is empty")
    shown = ", ".join(map(str, sorted(seen)[:12])) + (", ..." if len(seen) > 12 else "")
    return LabelTables(value_table([*seen, ignore_index]), lut,
                       f"the values of {field} ({shown}) and the ignore index {ignore_index}")
