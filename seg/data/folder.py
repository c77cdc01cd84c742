"""The generic folder layout: images and masks paired by file stem.

  <root>/<split>/images/<stem>.(jpg|jpeg|png|bmp|tif|tiff)
  <root>/<split>/masks/<stem>.png          class indices, paired with the image by stem
  <root>/classes.json                      optional: classes, palette, ignore_index,
                                           stats.train_rgb_mean / train_rgb_std
Masks hold the class indices, or other values mapped by data.reduce_zero_label (0 ignored, k ->
class k - 1) or data.label_map ((stored value, class) pairs), so datasets stored as PNG ids are
read without converting their files (seg/data/labels.py).
"""
from __future__ import annotations

import os

from seg.data import files, labels, roots
from seg.data.files import DataError, PairedFiles

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_LAYOUT = "folder with <split>/images and <split>/masks"


def open_folder(data_cfg, split_field: str) -> PairedFiles:
    root = roots.root_dir(data_cfg, _LAYOUT)
    split = files.split_value(data_cfg, split_field)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(os.path.join(split_dir, "images")):
        splits = sorted(d for d in os.listdir(root)
                        if os.path.isdir(os.path.join(root, d, "images")))
        raise roots.MissingSplit(f"{split_dir}/images not found: data.{split_field}={split!r} "
                                 f"is not a split of {roots.describe(data_cfg, root)} (splits "
                                 f"there: {splits})")
    pairs = paired_by_stem(os.path.join(split_dir, "images"), os.path.join(split_dir, "masks"),
                           IMAGE_EXTS)
    info = folder_info(data_cfg, root)
    tables = label_tables(data_cfg, info.num_classes, info.ignore_index)
    if tables is None:
        return PairedFiles(info, pairs)
    return PairedFiles(info, pairs, tables.allowed, tables.lut, tables.expected)


def label_tables(data_cfg, num_classes: int, ignore_index: int) -> labels.LabelTables | None:
    """The tables of data.reduce_zero_label or data.label_map; None when the stored values are
    the class indices."""
    reduce, pairs = data_cfg.get("reduce_zero_label", False), tuple(data_cfg.get("label_map", ()))
    if reduce and pairs:
        raise ValueError("data.reduce_zero_label=True and data.label_map are both set: "
                         "use one (list 0 -> the ignore index in the map instead)")
    if reduce:
        return labels.reduce_zero_label(num_classes, ignore_index)
    return labels.value_map(pairs, num_classes, ignore_index) if pairs else None


def folder_info(data_cfg, root: str):
    """DatasetInfo from <root>/classes.json, checked against data.num_classes / ignore_index."""
    path = os.path.join(root, "classes.json")
    meta = files.load_json(path) if os.path.exists(path) else {}
    names = meta.get("classes") or [f"class_{i}" for i in range(data_cfg.num_classes)]
    files.check_num_classes(data_cfg, len(names), path)
    ignore = meta.get("ignore_index", data_cfg.ignore_index)
    if ignore != data_cfg.ignore_index:
        raise DataError(f"data.ignore_index={data_cfg.ignore_index} but {path} has ignore_index "
                        f"{ignore}: set --config.data.ignore_index={ignore}")
    stats = meta.get("stats", {})
    mean_std = (stats["train_rgb_mean"], stats["train_rgb_std"]) \
        if "train_rgb_mean" in stats and "train_rgb_std" in stats else None
    name = meta.get("name") or os.path.basename(os.path.normpath(root))
    return files.make_info(name, names, ignore, data_cfg.normalize, mean_std,
                           meta.get("palette", ()))


def paired_by_stem(image_dir: str, mask_dir: str, image_exts) -> list[tuple[str, str]]:
    """(image, mask) paths sorted by stem; every image needs <stem>.png in mask_dir and back."""
    images = {}
    for f in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(f)
        if f.startswith(".") or ext.lower() not in image_exts:
            continue
        if stem in images:
            raise DataError(f"{image_dir}: two images with stem {stem!r}: {images[stem]} and {f}")
        images[stem] = f
    if not images:
        raise DataError(f"{image_dir}: no images ({', '.join(image_exts)})")
    masks = {f[:-4] for f in _listdir(mask_dir) if f.endswith(".png") and not f.startswith(".")}
    missing, extra = sorted(images.keys() - masks), sorted(masks - images.keys())
    if missing:
        raise DataError(f"{os.path.join(image_dir, images[missing[0]])} has no mask "
                        f"{os.path.join(mask_dir, missing[0] + '.png')} "
                        f"({len(missing)} images without a mask)")
    if extra:
        raise DataError(f"{os.path.join(mask_dir, extra[0] + '.png')} has no image in {image_dir} "
                        f"({len(extra)} masks without an image)")
    return [(os.path.join(image_dir, images[s]), os.path.join(mask_dir, s + ".png"))
            for s in sorted(images)]


def _listdir(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: mask folder not found")
    return os.listdir(folder)
