"""Joint image/mask augmentation from config.data, on uint8 tensors (torchvision.transforms.v2).

A transform takes and returns (tv_tensors.Image uint8 (3,H,W), tv_tensors.Mask uint8 (H,W));
v2 applies each geometric step to both with the same parameters, resizes and warps the mask
with nearest neighbour (labels are never blended), and leaves the mask out of colour changes.
Output stays uint8: normalisation happens on the device after the copy (4x less to move).

Train, in order (each step only when its field asks for it):
  data.resize       shorter side resized to this (the Pet recipe's preprocessing)
  data.scale_range  random rescale by a factor uniform in the range (0.5-2.0 in the VOC recipes)
  data.crop_size    random (H, W) crop; smaller images are padded first (mask: ignore_index)
  data.hflip        horizontal flip, p = 0.5
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


class RandomScale(v2.Transform):
    """Rescales by a factor drawn uniformly from scale_range (image bilinear, mask nearest)."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = tuple(scale_range)

    def make_params(self, flat_inputs: list) -> dict:
        return {"scale": float(torch.empty(()).uniform_(*self.scale_range))}

    def transform(self, inpt, params: dict):
        h, w = TF.get_size(inpt)
        size = [max(1, round(h * params["scale"])), max(1, round(w * params["scale"]))]
        return TF.resize(inpt, size, antialias=True)


def train_transform(data_cfg, info: DatasetInfo) -> v2.Transform | None:
    """The training augmentation of data_cfg; None when it asks for none."""
    resize, scale, crop = _checked(data_cfg)
    jitter, distortion = data_cfg.color_jitter, data_cfg.perspective
    if jitter < 0:
        raise ValueError(f"data.color_jitter={jitter} must be >= 0")
    if not 0 <= distortion <= 1:
        raise ValueError(f"data.perspective={distortion} must be in [0, 1]")
    fill = _fill(info)
    steps = [v2.Resize(resize, antialias=True)] if resize else []
    if scale != (1.0, 1.0):
        steps.append(RandomScale(scale))
    if crop:
        steps.append(v2.RandomCrop(crop, pad_if_needed=True, fill=fill))
    if data_cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
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
