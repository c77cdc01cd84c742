"""Decoding image and mask files, the checks every sample passes, and the shared reader.

A bad file is never turned into a silently wrong sample: decode errors, truncated files, masks
whose size differs from their image, colour masks and out-of-range class values all raise
DataError with one line naming the file (and the config field when one is involved).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from seg.data.dataset import DatasetInfo, SegDataset
from seg.data.roots import MissingSplit
from seg.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_JPEG_MAGIC = b"\xff\xd8\xff"
_IMAGE_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr")   # 8-bit ones


def read_image(path: str) -> Tensor:
    """uint8 (3, H, W); grayscale and palette images are expanded to RGB, alpha dropped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read image file ({e.strerror})") from None
    if raw[:3] == _JPEG_MAGIC:
        # torchvision's libjpeg-turbo raises on truncated JPEGs; its PNG decoder can crash the
        # process on corrupt data, so everything that is not a JPEG goes through PIL
        try:
            return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                               mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise DataError(f"{path}: corrupt or truncated JPEG ({_first_line(e)})") from None
    with open_pil(path) as im:
        if im.mode not in _IMAGE_MODES:
            raise DataError(f"{path}: image mode {im.mode} is not 8-bit (expected RGB or L)")
        rgb = np.array(im.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def read_mask(path: str) -> Tensor:
    """uint8 (H, W) values as stored: grayscale values, or the indices of a palette PNG."""
    with open_pil(path) as im:
        if im.mode in ("RGB", "RGBA"):
            raise DataError(
                f"{path}: mask is an {im.mode} colour image; expected class indices (8-bit "
                f"grayscale or palette PNG): map its colours to indices with the dataset's palette "
                f"(classes.json 'palette') or save it as a palette ('P' mode) PNG")
        if im.mode not in ("1", "L", "P"):
            raise DataError(f"{path}: mask mode {im.mode} is not 8-bit class indices "
                            f"(expected L or P)")
        return torch.from_numpy(np.array(im, dtype=np.uint8))


def open_pil(path: str) -> Image.Image:
    """The image at `path`, decoded in full (so a truncated file fails here); DataError naming
    the file when it is missing, not an image, corrupt or truncated."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError(f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on (set elsewhere in "
                        f"this process); truncated files would be read as wrong samples: unset it")
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({_first_line(e)})") from None
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        im.close()
        raise DataError(f"{path}: corrupt or truncated image ({_first_line(e)})") from None
    return im


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def value_table(values: Sequence[int]) -> Tensor:
    """(256,) bool table: True at the stored mask values that are allowed."""
    table = torch.zeros(256, dtype=torch.bool)
    table[list(values)] = True
    return table


def check_values(mask: Tensor, allowed: Tensor, path: str, expected: str) -> None:
    """Raises when `mask` holds a value outside the `allowed` table, naming the values."""
    # numpy: torch.bincount and uint8 indexing are 10-50x slower on CPU at these sizes
    present = np.bincount(mask.numpy().ravel(), minlength=256) > 0
    bad = np.flatnonzero(present & ~allowed.numpy()).tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise DataError(f"{path}: mask values {shown} are outside {expected}")


class PairedFiles(SegDataset):
    """Samples read from (image file, mask file) pairs.

    The stored mask values are checked against `allowed` (256-entry bool table) and then mapped
    through `lut` (256-entry uint8 table, None = stored values are the class indices).
    Subclasses with per-sample tables (Oxford-IIIT Pet) override `tables`.
    """

    def __init__(self, info: DatasetInfo, pairs: Sequence[tuple[str, str]],
                 allowed: Tensor | None = None, lut: Tensor | None = None, expected: str = ""):
        self.info = info
        self.pairs = list(pairs)
        n, ignore = info.num_classes, info.ignore_index
        self._allowed = value_table([*range(n), ignore]) if allowed is None else allowed
        self._lut = lut
        self._expected = expected or (f"[0, {n}) and are not the ignore index {ignore} "
                                      f"(data.num_classes={n}, data.ignore_index={ignore})")

    def __len__(self) -> int:
        return len(self.pairs)

    def source(self, i: int) -> str:
        return " + ".join(self.pairs[i])

    def tables(self, i: int) -> tuple[Tensor, Tensor | None, str]:
        return self._allowed, self._lut, self._expected

    def load_mask(self, path: str) -> Tensor:
        return read_mask(path)

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[i]
        image, mask = read_image(image_path), self.load_mask(mask_path)
        if image.shape[1:] != mask.shape:
            raise DataError(f"{mask_path} is {tuple(mask.shape)} (HxW) but its image "
                            f"{image_path} is {tuple(image.shape[1:])}")
        allowed, lut, expected = self.tables(i)
        check_values(mask, allowed, mask_path, expected)
        return image, mask if lut is None else torch.from_numpy(lut.numpy()[mask.numpy()])


def check_exist(pairs: Sequence[tuple[str, str]]) -> None:
    """Every listed file is present (one directory listing per folder, not a stat per file)."""
    listings: dict[str, set] = {}
    for pair in pairs:
        for path in pair:
            folder, name = os.path.split(path)
            if folder not in listings:
                listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if name not in listings[folder]:
                raise DataError(f"{path}: file not found (listed in the split)")


def verify(ds: SegDataset) -> None:
    """Reads every sample once, so that a bad file fails now rather than mid-training."""
    for i in range(len(ds)):
        ds.read(i)


def make_info(name: str, class_names: Sequence[str], ignore_index: int, normalize: str,
              stats: tuple | None, palette: Sequence = ()) -> DatasetInfo:
    """`stats` = (mean, std) of the train split, used when normalize == "dataset"."""
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "dataset":
        if stats is None:
            raise DataError(f"data.normalize='dataset' but {name} has no train mean/std "
                            f"(classes.json stats.train_rgb_mean/std): add them or set "
                            f"data.normalize='imagenet'")
        mean, std = stats
    else:
        raise DataError(f"data.normalize={normalize!r} is not one of ('dataset', 'imagenet')")
    return DatasetInfo(name, tuple(class_names), ignore_index, tuple(map(float, mean)),
                       tuple(map(float, std)), tuple(tuple(map(int, c)) for c in palette))


def check_num_classes(data_cfg, num_classes: int, where: str) -> None:
    if data_cfg.num_classes != num_classes:
        raise DataError(f"data.num_classes={data_cfg.num_classes} but {where} has "
                        f"{num_classes} classes: set --config.data.num_classes={num_classes}")


def split_value(data_cfg, split_field: str) -> str:
    value = data_cfg[split_field]
    if not value:
        raise DataError(f"data.{split_field} is empty: data.name={data_cfg.name!r} is configured "
                        f"without that split")
    return value


def load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def read_lines(path: str, split_field: str = "") -> list[str]:
    """Non-empty, non-comment lines of a list file. When it is missing, the error names
    `split_field` (the config field that chose it) and the lists next to it."""
    try:
        with open(path) as f:
            return [l.strip() for l in f if l.strip() and not l.startswith("#")]
    except FileNotFoundError:
        if not split_field:
            raise DataError(f"{path}: file not found") from None
        names = sorted(f[:-4] for f in os.listdir(os.path.dirname(path)) if f.endswith(".txt"))
        raise MissingSplit(f"{path} not found: set {split_field} to one of {names}") from None
