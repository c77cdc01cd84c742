"""Inference over whole images: whole-image, sliding-window, and test-time augmentation, each
optionally on the image resized to fit a box (mmsegmentation's test-time Resize keep_ratio).

A `Forward` maps normalised images (B, 3, H, W) to logits (B, C, H, W) at the input size; a
`LogitsFn` maps (forward, images) to logits and is what the eval step calls
(`seg.train.make_eval_step(..., logits_fn=...)`). Every function here is pure, runs on the
images' device and never reads a value back to the host: window positions depend on shapes only.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg import functional, metrics
from seg.data.augment import fit_size
from seg.functional import Buffers, Params

Forward = Callable[[Tensor], Tensor]
LogitsFn = Callable[[Forward, Tensor], Tensor]
MODES = ("whole", "slide")


def model_forward(model: nn.Module, params: Params, buffers: Buffers) -> Forward:
    """The main head's logits of `model` on explicit params/buffers, in the model's current mode
    (the caller sets eval mode, outside any compiled code)."""
    return lambda images: functional.apply(model, params, buffers, images)[0]["out"]


def logits_whole(forward: Forward, images: Tensor) -> Tensor:
    return forward(images)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, size): every `stride`, the last one moved back to
    end at the border, so no window reaches outside the image and none needs padding."""
    window = min(window, size)
    count = max(math.ceil((size - window) / stride), 0) + 1
    return [min(i * stride, size - window) for i in range(count)]


def logits_sliding(forward: Forward, images: Tensor, window: Sequence[int],
                   stride: Sequence[int]) -> Tensor:
    """Logits from overlapping windows, averaged where they overlap (sum / count map).

    A window larger than the image shrinks to the image, so window >= image is whole-image
    inference exactly. stride <= window on each side, so every pixel is covered.
    """
    (wh, ww), (sh, sw) = _check_window(window, stride)
    h, w = images.shape[-2:]
    wh, ww = min(wh, h), min(ww, w)
    total, count = None, images.new_zeros(1, 1, h, w, dtype=torch.float32)
    for y in window_starts(h, wh, sh):
        for x in window_starts(w, ww, sw):
            out = forward(images[..., y:y + wh, x:x + ww])
            if total is None:  # summed in float32 even when the model runs in bf16
                total = out.new_zeros(*out.shape[:2], h, w,
                                      dtype=torch.promote_types(out.dtype, torch.float32))
            total[..., y:y + wh, x:x + ww] += out
            count[..., y:y + wh, x:x + ww] += 1
    return total / count


def probabilities(logits: Tensor) -> Tensor:
    """Class probabilities: softmax over channels, or the sigmoid of a single binary logit."""
    x = logits.float()
    return torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)


def logits_from_probabilities(probs: Tensor) -> Tensor:
    """Logits whose `probabilities` are `probs` (up to clamping away from 0 and 1), so that
    metrics.predict and the losses apply to averaged probabilities unchanged."""
    if probs.shape[1] == 1:
        return torch.logit(probs, eps=torch.finfo(probs.dtype).eps)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def tta(infer: Forward, images: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
        ) -> Tensor:
    """Test-time augmentation: the mean of the class probabilities over the scales (and their
    horizontal mirrors when `flip`), each taken at the original resolution.

    `infer` is images -> logits at the input size (a forward, or sliding-window inference over
    one). A rescaled image's logits are resized back bilinearly before the softmax; a scale that
    keeps the size is not resampled at all.
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales={tuple(scales)} must be non-empty and positive")
    h, w = images.shape[-2:]
    total, n = None, 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = images if size == (h, w) else _resize(images, size)
        for mirrored in ((False, True) if flip else (False,)):
            logits = infer(x.flip(-1)).flip(-1) if mirrored else infer(x)
            if size != (h, w):
                logits = _resize(logits, (h, w))
            p = probabilities(logits)
            total, n = (p if total is None else total + p), n + 1
    return total / n


def fitted(logits_fn: LogitsFn, box: Sequence[int]) -> LogitsFn:
    """logits_fn run on the images resized (bilinear) to fit `box` (augment.fit_size), its logits
    resized back to the images' size: metrics stay at the resolution of the ground truth.
    The images should be unpadded (data.pad_multiple=1): padding would count in the size."""
    def logits(forward: Forward, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        size = fit_size(h, w, box)
        if size == (h, w):
            return logits_fn(forward, images)
        return _resize(logits_fn(forward, _resize(images, size)), (h, w))

    return logits


def make_logits_fn(mode: str = "whole", window: Sequence[int] = (512, 512),
                   stride: Sequence[int] = (341, 341), scales: Sequence[float] = (1.0,),
                   flip: bool = False, scale_to: Sequence[int] = ()) -> LogitsFn:
    """The eval's (forward, images) -> logits. Without augmentation these are the model's own
    logits; with it, the logits of the averaged probabilities. scale_to: a (long, short) box
    the image is resized to fit first (`fitted`); the augmentation's scales are relative to
    that size."""
    scale_to = tuple(scale_to)
    if scale_to and (len(scale_to) != 2 or min(scale_to) < 1):
        raise ValueError(f"eval.scale_to={scale_to} must be () or (long side, short side), "
                         f"positive")
    if scale_to:
        return fitted(make_logits_fn(mode, window, stride, scales, flip), scale_to)
    if mode not in MODES:
        raise ValueError(f"eval.mode={mode!r} is not one of {MODES}")
    if mode == "slide":
        window, stride = _check_window(window, stride)
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"eval.scales={scales} must be non-empty and positive")

    def base(forward: Forward, images: Tensor) -> Tensor:
        if mode == "slide":
            return logits_sliding(forward, images, window, stride)
        return forward(images)

    if scales == (1.0,) and not flip:
        return base

    def augmented(forward: Forward, images: Tensor) -> Tensor:
        probs = tta(lambda x: base(forward, x), images, scales, flip)
        return logits_from_probabilities(probs)

    return augmented


def from_config(eval_cfg) -> LogitsFn:
    """make_logits_fn from config.eval (mode, window, stride, scales, flip, scale_to)."""
    return make_logits_fn(eval_cfg.mode, tuple(eval_cfg.window), tuple(eval_cfg.stride),
                          tuple(eval_cfg.scales), eval_cfg.flip,
                          tuple(eval_cfg.get("scale_to", ())))  # runs made before it: ()


def predict_labels(model: nn.Module, params: Params, buffers: Buffers, images: Tensor,
                   logits_fn: LogitsFn = logits_whole) -> Tensor:
    """(B, H, W) int64 labels of `model` in eval mode (a single channel is a binary logit)."""
    functional.set_mode(model, train=False)
    with torch.no_grad():
        logits = logits_fn(model_forward(model, params, buffers), images)
    return metrics.predict(logits)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _check_window(window: Sequence[int], stride: Sequence[int]) -> tuple[tuple, tuple]:
    window, stride = tuple(window), tuple(stride)
    if len(window) != 2 or min(window) < 1:
        raise ValueError(f"eval.window={window} must be (height, width), positive")
    if len(stride) != 2 or min(stride) < 1 or stride[0] > window[0] or stride[1] > window[1]:
        raise ValueError(f"eval.stride={stride} must be (height, width), positive and at most "
                         f"eval.window={window} (a larger stride leaves pixels uncovered)")
    return window, stride
