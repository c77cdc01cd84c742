"""Cityscapes (Cordts et al. 2016), fine annotations, the 19 classes of the benchmark.

data.root holds the official layout (what torchvision.datasets.Cityscapes reads):
  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      label ids 0-33
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png train ids 0-18, 255
An image's labelIds file is read when present, else its labelTrainIds file (written by
cityscapesScripts' createTrainIdLabelImgs.py, and all that mmsegmentation reads). Label ids map
to train ids through the official table; every other id, and 255 (the -1 of "license plate",
an id that is never drawn into the label images), is ignored. Splits: train (2975), val (500),
test (1525; its labels are withheld for the evaluation server, so the presets leave it out).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from seg.data import files, roots
from seg.data.files import DataError, PairedFiles

# The 19 evaluated classes of cityscapesScripts' label table, in train-id order 0-18: (name,
# label id, colour). Source: github.com/mcordts/cityscapesScripts,
# cityscapesscripts/helpers/labels.py (commit 0bcc4a7). Ids 0-6, 9, 10, 14-16, 18, 29, 30 have
# train id 255 there (void, parking, rail track, guard rail, bridge, tunnel, polegroup,
# caravan, trailer) and license plate has id -1.
_TRAIN_CLASSES = (
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)), ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)), ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)), ("person", 24, (220, 20, 60)), ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)), ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)), ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
CITYSCAPES_CLASSES = tuple(name for name, _, _ in _TRAIN_CLASSES)
CITYSCAPES_PALETTE = tuple(colour for _, _, colour in _TRAIN_CLASSES)
LABEL_IDS = range(34)     # the ids a labelIds image holds
_UNDRAWN = 255            # id -1 ("license plate") stored in a uint8 image
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LAYOUT = "Cityscapes folder with leftImg8bit/ and gtFine/"


def train_id_table(ignore_index: int) -> Tensor:
    """(256,) uint8: label id -> train id, everything else -> ignore_index."""
    lut = torch.full((256,), ignore_index, dtype=torch.uint8)
    for train_id, (_, label_id, _) in enumerate(_TRAIN_CLASSES):
        lut[label_id] = train_id
    return lut


def open_cityscapes(data_cfg, split_field: str) -> PairedFiles:
    root = roots.find_root(data_cfg, [""], "leftImg8bit", _LAYOUT)
    split = files.split_value(data_cfg, split_field)
    files.check_num_classes(data_cfg, len(CITYSCAPES_CLASSES), "Cityscapes")
    image_dir, label_dir = roots.split_folders(root, split_field, split, "leftImg8bit", "gtFine")
    # Cityscapes has no train statistics in common use: "dataset" means ImageNet's, as in
    # mmsegmentation's and torchvision's recipes
    info = files.make_info("cityscapes", CITYSCAPES_CLASSES, data_cfg.ignore_index,
                           data_cfg.normalize, (files.IMAGENET_MEAN, files.IMAGENET_STD),
                           CITYSCAPES_PALETTE)
    pairs, train_ids = _pairs(image_dir, label_dir)
    return CityscapesLabels(info, pairs, train_ids)


def _pairs(image_dir: str, label_dir: str) -> tuple[list[tuple[str, str]], list[bool]]:
    """(image, label file) of every image, and whether the label file holds train ids."""
    pairs, train_ids = [], []
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if not os.path.isdir(city_dir):
            continue
        labels_dir = os.path.join(label_dir, city)
        present = set(os.listdir(labels_dir)) if os.path.isdir(labels_dir) else set()
        for name in sorted(os.listdir(city_dir)):
            if not name.endswith(_IMAGE_SUFFIX):
                continue
            stem = name[:-len(_IMAGE_SUFFIX)]
            ids, trains = stem + "_gtFine_labelIds.png", stem + "_gtFine_labelTrainIds.png"
            if ids not in present and trains not in present:
                raise DataError(f"{os.path.join(city_dir, name)} has no label file "
                                f"{os.path.join(labels_dir, ids)} (nor _gtFine_labelTrainIds.png)")
            pairs.append((os.path.join(city_dir, name),
                          os.path.join(labels_dir, ids if ids in present else trains)))
            train_ids.append(ids not in present)
    if not pairs:
        raise DataError(f"{image_dir}: no <city>/*{_IMAGE_SUFFIX} images")
    return pairs, train_ids


class CityscapesLabels(PairedFiles):
    """Label ids mapped to train ids; labelTrainIds files read as they are (255 -> ignore)."""

    def __init__(self, info, pairs, train_ids: list[bool]):
        super().__init__(info, pairs)
        self.train_ids = train_ids
        ignore = info.ignore_index
        self._label_id_tables = (files.value_table([*LABEL_IDS, _UNDRAWN]), train_id_table(ignore),
                                 "the Cityscapes label ids 0-33 (and 255 for id -1)")
        as_is = torch.arange(256, dtype=torch.uint8)
        as_is[255] = ignore
        self._train_id_tables = (files.value_table([*range(len(_TRAIN_CLASSES)), 255]), as_is,
                                 "the Cityscapes train ids 0-18 and 255 (ignored)")

    def tables(self, i: int) -> tuple[Tensor, Tensor, str]:
        return self._train_id_tables if self.train_ids[i] else self._label_id_tables
