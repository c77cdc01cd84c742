"""Pure loss functions for segmentation: logits (B, C, H, W), integer target (B, H, W).

Every loss
* is computed in at least float32, whatever the logits' dtype (bf16 autocast outputs included);
* excludes `ignore_index` pixels with torch.where / multiplication, never boolean indexing, so it
  has a fixed shape, no host sync, and compiles into one graph;
* gives ignored pixels exactly zero loss and exactly zero gradient, and returns 0.0 with zero
  gradients for a batch in which every pixel is ignored (no 0/0 anywhere, forward or backward).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Losses that read a single logit channel; the model builder gives such models one output.
BINARY_LOSSES = frozenset({"bce", "bce_soft_iou"})
_MULTICLASS_LOSSES = frozenset({"cross_entropy", "focal", "dice"})
_WEIGHTED_LOSSES = frozenset({"cross_entropy", "focal"})


def _check_shapes(logits: Tensor, target: Tensor) -> None:
    if logits.ndim < 2:
        raise ValueError(f"logits must be (B, C, ...), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )


def _prepare(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Upcast logits; return them, the valid-pixel mask, and a target safe to index with."""
    _check_shapes(logits, target)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = target != ignore_index
    # Ignored pixels read class 0 so that gather / weight lookups stay in range; their terms
    # are zeroed afterwards.
    safe = torch.where(valid, target, 0).long()
    return x, valid, safe


def _mean_over_valid(per_pixel: Tensor, valid: Tensor, pixel_weight: Tensor | None = None
                     ) -> Tensor:
    """sum(w * loss) / sum(w) over valid pixels (w = 1 without class weights, 0 where ignored).

    The denominator is replaced by 1 when nothing is valid: 0 / 1 keeps both the value and the
    gradient at zero, whereas 0 / 0 would make them NaN.
    """
    w = valid.to(per_pixel.dtype)
    if pixel_weight is not None:
        w = w * pixel_weight
    total = w.sum()
    return (per_pixel * w).sum() / torch.where(total > 0, total, 1.0)


def _class_weight(weight: Tensor | None, num_classes: int, safe: Tensor, x: Tensor
                  ) -> Tensor | None:
    if weight is None:
        return None
    if weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
    return weight.to(device=x.device, dtype=x.dtype)[safe]


def _target_log_prob(logits: Tensor, target: Tensor, ignore_index: int, loss: str):
    if logits.ndim >= 2 and logits.shape[1] < 2:
        raise ValueError(f"{loss} needs >= 2 logit channels, got {logits.shape[1]}; "
                         "use bce for a single logit")
    x, valid, safe = _prepare(logits, target, ignore_index)
    log_p = F.log_softmax(x, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    return x, valid, safe, log_p


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = 255,
                  weight: Tensor | None = None) -> Tensor:
    """Mean softmax cross-entropy over valid pixels; the class-weighted mean of F.cross_entropy."""
    x, valid, safe, log_p = _target_log_prob(logits, target, ignore_index, "cross_entropy")
    return _mean_over_valid(-log_p, valid, _class_weight(weight, x.shape[1], safe, x))


def focal_loss(logits: Tensor, target: Tensor, *, gamma: float = 2.0, ignore_index: int = 255,
               weight: Tensor | None = None) -> Tensor:
    """Softmax focal loss (Lin et al. 2017): mean over valid pixels of (1 - p_t)^gamma * CE.

    Weighted like `cross_entropy`, so gamma = 0 gives exactly the cross-entropy.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    x, valid, safe, log_p = _target_log_prob(logits, target, ignore_index, "focal")
    # -expm1(log p) is 1 - p without cancellation. The clamp keeps the base > 0: at p_t = 1
    # (reached in float32 by confident pixels, and by ignored ones reading class 0)
    # d(1-p)^gamma/dp is infinite for gamma < 1, and inf * 0 would put NaN in the gradient.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(x.dtype).tiny)
    per_pixel = one_minus_p**gamma * -log_p
    return _mean_over_valid(per_pixel, valid, _class_weight(weight, x.shape[1], safe, x))


def _binary(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 1, ...) logits -> logit, valid mask and float target (0 at ignored pixels), (B, ...)."""
    if logits.ndim < 2 or logits.shape[1] != 1:
        raise ValueError(
            f"binary losses need logits of shape (B, 1, ...), got {tuple(logits.shape)}")
    x, valid, safe = _prepare(logits, target, ignore_index)
    return x[:, 0], valid, safe.to(x.dtype)


def bce_with_logits(logits: Tensor, target: Tensor, *, ignore_index: int = 255) -> Tensor:
    """Mean binary cross-entropy over valid pixels.

    target holds 0, 1 or ignore_index; other values are not checked (that would need a host sync).
    """
    x, valid, y = _binary(logits, target, ignore_index)
    return _mean_over_valid(F.binary_cross_entropy_with_logits(x, y, reduction="none"), valid)


def bce_soft_iou(logits: Tensor, target: Tensor, *, ignore_index: int = 255, eps: float = 1e-7
                 ) -> Tensor:
    """BCE + (1 - soft IoU) of the sigmoid probabilities, over the valid pixels of the whole batch.

    soft IoU = (sum p*y + eps) / (sum p + y - p*y + eps) (seed 003). eps only settles the empty
    case: no valid pixels gives IoU 1, so the loss is 0.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    x, valid, y = _binary(logits, target, ignore_index)
    bce = _mean_over_valid(F.binary_cross_entropy_with_logits(x, y, reduction="none"), valid)
    # Multiplying by the mask (not indexing) drops ignored pixels from both sums, gradient included.
    p = torch.sigmoid(x) * valid
    intersection = (p * y).sum()
    union = (p + y - p * y).sum()
    return bce + 1 - (intersection + eps) / (union + eps)


def dice_loss(logits: Tensor, target: Tensor, *, ignore_index: int = 255, eps: float = 1.0
              ) -> Tensor:
    """Soft Dice loss, 1 - mean over classes of (2 sum p*y + eps) / (sum p + sum y + eps).

    Sums run over the valid pixels of the whole batch. One channel: sigmoid probabilities of the
    foreground (target 0 / 1), Dice of that class only. C > 1 channels: softmax, every class.
    eps > 0 gives a class absent from target and prediction a Dice of 1, and an all-ignored batch
    a loss of 0.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    x, valid, safe = _prepare(logits, target, ignore_index)
    num_classes = x.shape[1]
    mask = valid.unsqueeze(1).to(x.dtype)
    if num_classes == 1:
        probs, onehot = torch.sigmoid(x), safe.unsqueeze(1).to(x.dtype)
    else:
        # A comparison against arange, not F.one_hot: the latter validates its input on some
        # backends with a host sync.
        classes = torch.arange(num_classes, device=x.device).view(1, -1, *([1] * (x.ndim - 2)))
        probs, onehot = F.softmax(x, dim=1), (safe.unsqueeze(1) == classes).to(x.dtype)
    probs, onehot = probs * mask, onehot * mask
    dims = (0, *range(2, x.ndim))
    intersection = (probs * onehot).sum(dims)
    cardinality = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * intersection + eps) / (cardinality + eps)).mean()


def total_loss(outputs: dict, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
               aux_weight: float) -> Tensor:
    """loss_fn(outputs["out"]) + aux_weight * loss_fn(outputs["aux"]).

    The auxiliary term is skipped when the model has no "aux" head or aux_weight is 0.
    """
    if "out" not in outputs:
        raise ValueError(f"outputs must have an 'out' entry, got keys {sorted(outputs)}")
    if aux_weight < 0:
        raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
    loss = loss_fn(outputs["out"], target)
    if aux_weight and outputs.get("aux") is not None:
        loss = loss + aux_weight * loss_fn(outputs["aux"], target)
    return loss


def build(loss_cfg, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """loss_fn(logits, target) from a config with fields name, gamma, class_weights (a tuple,
    empty for none) and ignore_index."""
    name, weights = loss_cfg.name, tuple(loss_cfg.class_weights)
    names = sorted(BINARY_LOSSES | _MULTICLASS_LOSSES)
    if name not in names:
        raise ValueError(f"loss.name must be one of {names}, got {name!r}")
    if name in BINARY_LOSSES and num_classes != 2:
        raise ValueError(f"loss {name!r} is binary (one logit): needs num_classes == 2, "
                         f"got {num_classes}")
    if weights and name not in _WEIGHTED_LOSSES:
        raise ValueError(f"loss.class_weights is not supported by loss {name!r}, got {weights}")
    if weights and len(weights) != num_classes:
        raise ValueError(f"loss.class_weights must have num_classes={num_classes} entries, "
                         f"got {weights}")
    ignore = {"ignore_index": loss_cfg.ignore_index}
    weight = {"weight": torch.tensor(weights, dtype=torch.float32) if weights else None}
    if name == "cross_entropy":
        return functools.partial(cross_entropy, **ignore, **weight)
    if name == "focal":
        return functools.partial(focal_loss, gamma=loss_cfg.gamma, **ignore, **weight)
    unweighted = {"bce": bce_with_logits, "bce_soft_iou": bce_soft_iou, "dice": dice_loss}
    return functools.partial(unweighted[name], **ignore)
