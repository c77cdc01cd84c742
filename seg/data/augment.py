"""Joint image/mask augmentation from config.data, on uint8 tensors (torchvision.transforms.v2).

A transform takes and returns (tv_tensors.Image uint8 (3,H,W), tv_tensors.Mask uint8 (H,W));
v2 applies each geometric step to both with the same parameters, resizes and warps the mask
with nearest neighbour (labels are never blended), and leaves the mask out of colour changes.
Output stays uint8: normalisation happens on the device after the copy (4x less to move).

Train, in order (each step only when its field asks for it):
  data.resize       shorter side resized to this (the Pet recipe's preprocessing)
  data.scale_range  random rescale by a factor uniform in the range (0.5-2.0 in the VOC recipes);
  data.scale_to     with a (long, short) box, the factor scales the box and the image is resized,
                    keeping its aspect, to fit it (mmsegmentation's RandomResize)
  data.crop_size    random (H, W) crop; smaller images are padded first (mask: ignore_index);
  data.crop_max_class_ratio  below 1, redrawn while one class dominates (cat_max_ratio)
  data.hflip        horizontal flip, p = 0.5
  data.photometric  mmsegmentation's PhotoMetricDistortion (seg/data/photometric.py)
  data.color_jitter brightness / contrast / saturation of this strength, p = 0.5
  data.perspective  random perspective of this distortion scale, p = 0.5
Eval: data.resize, then a centre crop of data.crop_size (the Pet recipe's preprocessing); without
data.resize, whole images (the loader pads them to a common size).

Padding and perspective fill the image with the dataset's mean colour, so that it is ~0 after
normalisation, as padding a normalised image with 0 would, and as the eval padding does.
The random draws come from torch's global generator: the loader seeds it per sample.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from seg.data.dataset import DatasetInfo
from seg.data.photometric import PhotoMetricDistortion

CROP_TRIES = 10   # redraws of a crop that one class dominates (mmsegmentation's RandomCrop)


def fit_size(h: int, w: int, box: Sequence[float]) -> tuple[int, int]:
    """(H, W) of an h x w image resized, keeping its aspect, to the largest size whose long
    side fits max(box) and short side min(box); mmcv's rescale_size, rounding included."""
    f = min(max(box) / max(h, w), min(box) / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


class RandomScale(v2.Transform):
    """Rescales by a factor drawn uniformly from scale_range (image bilinear, mask nearest).
    With a (long, short) `box`, the factor r scales the box (mmcv truncates it to integers)
    and the image is resized to fit int(r * long) x int(r * short) (`fit_size`)."""

    def __init__(self, scale_range: tuple[float, float], box: Sequence[int] = ()):
        super().__init__()
        self.scale_range, self.box = tuple(scale_range), tuple(box)

    def make_params(self, flat_inputs: list) -> dict:
        return {"scale": float(torch.empty(()).uniform_(*self.scale_range))}

    def transform(self, inpt, params: dict):
        h, w = TF.get_size(inpt)
        r = params["scale"]
        if self.box:
            size = list(fit_size(h, w, [int(side * r) for side in self.box]))
        else:
            size = [max(1, round(h * r)), max(1, round(w * r))]
        return TF.resize(inpt, size, antialias=True)


class RandomCropMaxClass(v2.RandomCrop):
    """v2.RandomCrop (pad_if_needed) whose window is redrawn, at most CROP_TRIES times, while
    a single class covers `max_ratio` or more of the window's labelled pixels or it holds one
    class only; the last draw is kept (mmsegmentation's RandomCrop with cat_max_ratio)."""

    def __init__(self, size, max_ratio: float, ignore_index: int, fill):
        super().__init__(size, pad_if_needed=True, fill=fill)
        self.max_ratio, self.ignore_index = max_ratio, ignore_index

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        if self.max_ratio >= 1 or not masks:
            return params
        for _ in range(CROP_TRIES):
            if self._balanced(masks[0], params):
                break
            params = super().make_params(flat_inputs)
        return params

    def _balanced(self, mask: Tensor, params: dict) -> bool:
        left, top = params["padding"][:2]   # the window is in padded coordinates
        y, x = max(params["top"] - top, 0), max(params["left"] - left, 0)
        window = mask[y:params["top"] - top + params["height"],
                      x:params["left"] - left + params["width"]]
        counts = torch.bincount(window.reshape(-1).long(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.max_ratio


def train_transform(data_cfg, info: DatasetInfo) -> v2.Transform | None:
    """The training augmentation of data_cfg; None when it asks for none."""
    resize, scale, crop = _checked(data_cfg)
    jitter, distortion = data_cfg.color_jitter, data_cfg.perspective
    box, max_class = _box(data_cfg, "data.scale_to"), data_cfg.get("crop_max_class_ratio", 1.0)
    if jitter < 0:
        raise ValueError(f"data.color_jitter={jitter} must be >= 0")
    if not 0 <= distortion <= 1:
        raise ValueError(f"data.perspective={distortion} must be in [0, 1]")
    if not 0 < max_class <= 1:
        raise ValueError(f"data.crop_max_class_ratio={max_class} must be in (0, 1] (1 = off)")
    fill = _fill(info)
    steps = [v2.Resize(resize, antialias=True)] if resize else []
    if scale != (1.0, 1.0) or box:
        steps.append(RandomScale(scale, box))
    if crop:
        steps.append(RandomCropMaxClass(crop, max_class, info.ignore_index, fill))
    if data_cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if data_cfg.get("photometric", False):
        steps.append(PhotoMetricDistortion())
    if jitter:
        steps.append(v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter)], p=0.5))
    if distortion:
        steps.append(v2.RandomPerspective(distortion, p=0.5, fill=fill))
    return v2.Compose(steps) if steps else None


def eval_transform(data_cfg, info: DatasetInfo) -> v2.Transform | None:
    """The deterministic part: data.resize, then a centre crop of data.crop_size; else None."""
    resize, _, crop = _checked(data_cfg)
    if not resize:
        return None
    return v2.Compose([v2.Resize(resize, antialias=True)] + ([v2.CenterCrop(crop)] if crop else []))


def apply(transform: v2.Transform | None, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Runs `transform` on one uint8 pair and returns plain tensors."""
    if transform is None:
        return image, mask
    image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(Tensor), mask.as_subclass(Tensor)


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 colour that normalises to ~0 (mean on the 0-1 scale)."""
    return tuple(round(255 * m) for m in mean)


def _fill(info: DatasetInfo) -> dict:
    return {tv_tensors.Image: mean_colour(info.mean), tv_tensors.Mask: info.ignore_index}


def _box(cfg, field: str) -> tuple[int, int] | tuple[()]:
    """A (long, short) box field of `cfg` (read with .get: old run configs lack it); () = off."""
    box = tuple(cfg.get(field.split(".")[-1], ()))
    if box and (len(box) != 2 or min(box) < 1):
        raise ValueError(f"{field}={box} must be () or (long side, short side), positive")
    return box


def _checked(data_cfg) -> tuple[int, tuple[float, float], tuple[int, int] | tuple[()]]:
    """(resize, scale_range, crop_size) after checking them: one line naming the field."""
    resize, scale, crop = data_cfg.resize, tuple(data_cfg.scale_range), tuple(data_cfg.crop_size)
    if resize < 0:
        raise ValueError(f"data.resize={resize} must be >= 0 (0 = off)")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"data.scale_range={scale} must be (low, high) with 0 < low <= high")
    if crop and (len(crop) != 2 or min(crop) < 1):
        raise ValueError(f"data.crop_size={crop} must be () or (height, width), positive")
    return resize, (float(scale[0]), float(scale[1])), crop
