"""mmsegmentation's PhotoMetricDistortion (data.photometric), on uint8 (3, H, W) tensors.

Each step runs with probability 0.5, in this order: brightness (add a value uniform in
[-32, 32]); contrast (multiply by a factor uniform in [0.5, 1.5]) either here or last, chosen
with equal odds; saturation (HSV saturation times a factor uniform in [0.5, 1.5], capped at
full saturation); hue (HSV hue shifted by an integer in [-18, 18) of OpenCV's 180 steps, i.e.
2 degrees each). Brightness and contrast truncate to uint8 as that transform does
(mmseg/datasets/transforms/transforms.py, mmsegmentation 1.2.2). Saturation and hue are
computed in float and rounded once, where it goes through OpenCV's 8-bit HSV image (hue in
2-degree steps), so its pixels can differ from these by a few levels; the distribution of
the distortion is the same. Masks pass through unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


def affine(image: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """uint8 image * alpha + beta, clipped to [0, 255] and truncated to uint8."""
    return (image.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)


def saturate(image: Tensor, factor: float) -> Tensor:
    """Float RGB (3, H, W) with its HSV saturation multiplied by `factor` (capped at 1) and hue
    and value kept. With H and V fixed, each channel is V - S * V * k(H), so scaling S scales
    every channel's distance to the maximum channel V."""
    value, low = image.max(0).values, image.min(0).values
    spread = value - low
    # the largest factor that keeps S <= 1, i.e. the minimum channel >= 0
    cap = torch.where(spread > 0, value / spread.clamp_min(1e-12), torch.full_like(value, factor))
    return value - torch.minimum(cap, torch.full_like(cap, factor)) * (value - image)


class PhotoMetricDistortion(v2.Transform):
    def make_params(self, flat_inputs: list) -> dict:
        """Every draw is made, applied or not (None: not applied this time)."""
        on = torch.randint(2, (5,)).bool().tolist()   # brightness, contrast, saturation, hue, mode
        u = torch.rand(3).tolist()
        shift = int(torch.randint(-HUE_DELTA, HUE_DELTA, ()))
        return {"brightness": (2 * u[0] - 1) * BRIGHTNESS_DELTA if on[0] else None,
                "contrast": _between(CONTRAST_RANGE, u[1]) if on[1] else None,
                "saturation": _between(SATURATION_RANGE, u[2]) if on[2] else None,
                "hue": shift if on[3] else None, "contrast_last": on[4]}

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask) or not isinstance(inpt, Tensor):
            return inpt
        x = inpt.as_subclass(Tensor)
        contrast = params["contrast"]
        if params["brightness"] is not None:
            x = affine(x, beta=params["brightness"])
        if contrast is not None and not params["contrast_last"]:
            x = affine(x, alpha=contrast)
        if params["saturation"] is not None:
            x = saturate(x.float(), params["saturation"]).round_().clamp_(0, 255).to(torch.uint8)
        if params["hue"]:   # 2 degrees per step: a 1/180 turn, in float, rounded once
            turned = TF.adjust_hue(x.float() / 255, params["hue"] / 180)
            x = turned.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        if contrast is not None and params["contrast_last"]:
            x = affine(x, alpha=contrast)
        return tv_tensors.wrap(x, like=inpt)


def _between(bounds: tuple[float, float], u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u
