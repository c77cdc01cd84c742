"""Oxford-IIIT Pet (Parkhi et al. 2012) as a three-class task: 0 background, 1 cat, 2 dog, 255 border.

data.root holds images/<name>.jpg, annotations/trimaps/<name>.png and the official lists
annotations/{trainval,test}.txt (columns: name class_id species breed_id; species 1 = cat,
2 = dog). A trimap pixel 1 (pet) becomes the image's species, 2 (background) 0, 3 (border) 255.
Splits: "trainval" and "test" are the official lists; "val" is every fifth line of trainval.txt
(lines 5, 10, 15, ... counting from 1: 736 of 3680, every breed represented since the list is
sorted by breed) and "train" the other four fifths (2944).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from seg.data import files, roots
from seg.data.files import DataError, PairedFiles

PET_CLASSES = ("background", "cat", "dog")
PET_PALETTE = ((0, 0, 0), (255, 128, 0), (0, 128, 255))
SPLITS = ("train", "val", "trainval", "test")
_VAL_EVERY = 5
_PET, _BACKGROUND, _BORDER = 1, 2, 3   # trimap values


def open_pets(data_cfg, split_field: str) -> PairedFiles:
    root = roots.find_root(data_cfg, [""], "annotations/trainval.txt",
                           "Oxford-IIIT Pet folder with images/ and annotations/")
    split = files.split_value(data_cfg, split_field)
    if split not in SPLITS:
        raise DataError(f"data.{split_field}={split!r} is not an Oxford-IIIT Pet split {SPLITS}")
    files.check_num_classes(data_cfg, len(PET_CLASSES), "Oxford-IIIT Pet")
    # ImageNet statistics for "dataset" too: the seed normalises with them
    info = files.make_info("pets", PET_CLASSES, data_cfg.ignore_index, data_cfg.normalize,
                           (files.IMAGENET_MEAN, files.IMAGENET_STD), PET_PALETTE)
    rows = _rows(root, "test" if split == "test" else "trainval")
    if split == "val":
        rows = rows[_VAL_EVERY - 1::_VAL_EVERY]
    elif split == "train":
        rows = [r for k, r in enumerate(rows) if k % _VAL_EVERY != _VAL_EVERY - 1]
    pairs = [(os.path.join(root, "images", name + ".jpg"),
              os.path.join(root, "annotations", "trimaps", name + ".png")) for name, _ in rows]
    files.check_exist(pairs)
    return PetTrimaps(info, pairs, [species for _, species in rows])


def _rows(root: str, listed: str) -> list[tuple[str, int]]:
    """(name, species) per line of annotations/<listed>.txt."""
    path = os.path.join(root, "annotations", listed + ".txt")
    rows = []
    for line in files.read_lines(path):
        fields = line.split()
        if len(fields) != 4 or fields[2] not in ("1", "2"):
            raise DataError(f"{path}: line {line!r} is not 'name class_id species(1|2) breed_id'")
        rows.append((fields[0], int(fields[2])))
    return rows


class PetTrimaps(PairedFiles):
    """Trimaps mapped per image: the pet pixels take the image's species."""

    def __init__(self, info, pairs, species: list[int]):
        super().__init__(info, pairs)
        self.species = species
        self._trimap_values = files.value_table((_PET, _BACKGROUND, _BORDER))
        self._luts = {}
        for s in (1, 2):
            lut = torch.full((256,), info.ignore_index, dtype=torch.uint8)
            lut[_PET], lut[_BACKGROUND] = s, 0
            self._luts[s] = lut

    def tables(self, i: int) -> tuple[Tensor, Tensor, str]:
        return (self._trimap_values, self._luts[self.species[i]],
                "the trimap values 1 (pet), 2 (background), 3 (border)")
