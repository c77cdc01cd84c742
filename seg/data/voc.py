"""PASCAL VOC 2012 segmentation, optionally with the SBD "aug" train set.

data.root is the folder holding VOCdevkit/VOC2012, or VOC2012 itself:
  ImageSets/Segmentation/<split>.txt   image ids (train 1464, val 1449, trainval)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png           palette PNGs whose indices are the classes, 255 = border
data.sbd_root (train split only) adds the Semantic Boundaries Dataset, either SBD's own
`dataset/` folder (cls/<id>.mat, train.txt, val.txt; needs scipy) or a SegmentationClassAug
folder of index PNGs. The aug train set is the standard one: SBD train + SBD val + VOC train,
minus every VOC val image (10582 images); VOC's own mask is used where an image has one.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from seg.data import files, roots
from seg.data.files import DataError, PairedFiles

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
_LAYOUT = "folder holding VOCdevkit/VOC2012"


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """VOC's colour map: the bits of the class index spread over R, G, B from the high bit down."""
    colours = []
    for i in range(n):
        rgb, c = [0, 0, 0], i
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        colours.append(tuple(rgb))
    return tuple(colours)


def open_voc(data_cfg, split_field: str) -> PairedFiles:
    voc = roots.find_root(data_cfg, ["VOCdevkit/VOC2012", "VOC2012", ""],
                          "ImageSets/Segmentation", _LAYOUT)
    files.check_num_classes(data_cfg, len(VOC_CLASSES), "PASCAL VOC")
    if data_cfg.ignore_index != 255:
        raise DataError(f"data.ignore_index={data_cfg.ignore_index} but VOC masks mark borders "
                        f"with 255: set --config.data.ignore_index=255")
    # VOC has no train statistics in common use: "dataset" means ImageNet's, as in the
    # torchvision and mmsegmentation recipes
    info = files.make_info("voc", VOC_CLASSES, 255, data_cfg.normalize,
                           (files.IMAGENET_MEAN, files.IMAGENET_STD),
                           voc_palette(len(VOC_CLASSES)))
    ids, sbd_masks = _ids(voc, data_cfg, split_field), {}
    if data_cfg.sbd_root and split_field == "train_split":
        ids, sbd_masks = _with_sbd(voc, data_cfg, ids)
    voc_masks = os.path.join(voc, "SegmentationClass")
    has_voc_mask = set(os.listdir(voc_masks)) if os.path.isdir(voc_masks) else set()

    def mask_file(i: str) -> str:
        if i in sbd_masks and i + ".png" not in has_voc_mask:
            return sbd_masks[i]
        return os.path.join(voc_masks, i + ".png")
    pairs = [(os.path.join(voc, "JPEGImages", i + ".jpg"), mask_file(i)) for i in ids]
    files.check_exist(pairs)
    return SbdAwarePairs(info, pairs)


def _ids(voc: str, data_cfg, split_field: str) -> list[str]:
    split = files.split_value(data_cfg, split_field)
    path = os.path.join(voc, "ImageSets", "Segmentation", split + ".txt")
    return files.read_lines(path, f"data.{split_field}")


def _with_sbd(voc: str, data_cfg, voc_train: list[str]) -> tuple[list[str], dict[str, str]]:
    """The aug train ids and the SBD mask file of each SBD id."""
    sbd = data_cfg.sbd_root
    if os.path.isdir(os.path.join(sbd, "dataset", "cls")):
        sbd = os.path.join(sbd, "dataset")
    if os.path.isdir(os.path.join(sbd, "cls")):
        sbd_ids = (files.read_lines(os.path.join(sbd, "train.txt"))
                   + files.read_lines(os.path.join(sbd, "val.txt")))
        sbd_masks = {i: os.path.join(sbd, "cls", i + ".mat") for i in sbd_ids}
    elif os.path.isdir(sbd) and any(f.endswith(".png") for f in os.listdir(sbd)):
        sbd_masks = {f[:-4]: os.path.join(sbd, f) for f in os.listdir(sbd) if f.endswith(".png")}
    else:
        raise DataError(f"data.sbd_root={sbd!r} holds neither SBD's cls/*.mat with train.txt and "
                        f"val.txt nor SegmentationClassAug *.png masks")
    val = set(_ids(voc, data_cfg, "val_split"))
    return sorted((set(sbd_masks) | set(voc_train)) - val), sbd_masks


class SbdAwarePairs(PairedFiles):
    """VOC pairs whose masks may be SBD .mat files."""

    def load_mask(self, path: str) -> Tensor:
        return read_sbd_mat(path) if path.endswith(".mat") else super().load_mask(path)


def read_sbd_mat(path: str) -> Tensor:
    """The class map GTcls.Segmentation of an SBD cls/<id>.mat file, uint8 (H, W)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading SBD .mat masks needs scipy (pip install scipy), or set "
                        f"data.sbd_root to a SegmentationClassAug folder of PNG masks") from None
    try:
        seg = loadmat(path)["GTcls"][0]["Segmentation"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"{path}: not an SBD class .mat file ({e})") from None
    return torch.from_numpy(np.asarray(seg, dtype=np.uint8).copy())
