"""Pure loss functions for segmentation: logits (B, C, H, W), integer target (B, H, W).

Every loss
* is computed in at least float32, whatever the logits' dtype (bf16 autocast outputs included);
* excludes `ignore_index` pixels with torch.where / multiplication, never boolean indexing, so it
  has a fixed shape, no host sync, and compiles into one graph;
* gives ignored pixels exactly zero loss and exactly zero gradient, and returns 0.0 with zero
  gradients for a batch in which every pixel is ignored (no 0/0 anywhere, forward or backward);
* is a `Loss`: a reduction of sums that add up over batches, so that an evaluation gets the loss
  of a whole split exactly.
"""

from __future__ import annotations

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


def _weighted_sums(per_pixel: Tensor, valid: Tensor, pixel_weight: Tensor | None = None
                   ) -> dict[str, Tensor]:
    """sum(w * loss) and sum(w) over valid pixels (w = 1 without class weights, 0 where
    ignored): their ratio is the (class-weighted) mean, F.cross_entropy's reduction."""
    w = valid.to(per_pixel.dtype)
    if pixel_weight is not None:
        w = w * pixel_weight
    return {"loss": (per_pixel * w).sum(), "weight": w.sum()}


def _weighted_mean(sums: dict[str, Tensor], **_) -> Tensor:
    """sum(w * loss) / sum(w). The denominator is replaced by 1 when nothing is valid: 0 / 1
    keeps both the value and the gradient at zero, whereas 0 / 0 would make them NaN."""
    total = sums["weight"]
    return sums["loss"] / torch.where(total > 0, total, 1.0)


class Loss:
    """A loss written as a reduction of additive sums.

    `sums(logits, target)` returns tensors that add up over pixels, images, batches and ranks;
    `reduce(sums)` turns them into the loss. Calling the loss on one batch is
    reduce(sums(batch)); reducing the sums accumulated over a whole split gives the loss of
    the split taken as one batch, the same whatever the batch size or the number of ranks
    (seg/train.py's evaluation). `bind(**options)` fixes keyword options (ignore_index, weight,
    gamma, eps) for both parts.
    """

    def __init__(self, sums: Callable[..., dict], reduce: Callable[..., Tensor], **options):
        self._sums, self._reduce, self.options = sums, reduce, options

    def bind(self, **options) -> "Loss":
        return Loss(self._sums, self._reduce, **{**self.options, **options})

    def sums(self, logits: Tensor, target: Tensor, **options) -> dict[str, Tensor]:
        return self._sums(logits, target, **{**self.options, **options})

    def reduce(self, sums: dict[str, Tensor], **options) -> Tensor:
        return self._reduce(sums, **{**self.options, **options})

    def __call__(self, logits: Tensor, target: Tensor, **options) -> Tensor:
        options = {**self.options, **options}
        return self._reduce(self._sums(logits, target, **options), **options)


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


def _cross_entropy_sums(logits: Tensor, target: Tensor, *, ignore_index: int = 255,
                        weight: Tensor | None = None) -> dict[str, Tensor]:
    x, valid, safe, log_p = _target_log_prob(logits, target, ignore_index, "cross_entropy")
    return _weighted_sums(-log_p, valid, _class_weight(weight, x.shape[1], safe, x))


# Mean softmax cross-entropy over valid pixels; the class-weighted mean of F.cross_entropy.
cross_entropy = Loss(_cross_entropy_sums, _weighted_mean)


def _focal_sums(logits: Tensor, target: Tensor, *, gamma: float = 2.0, ignore_index: int = 255,
                weight: Tensor | None = None) -> dict[str, Tensor]:
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    x, valid, safe, log_p = _target_log_prob(logits, target, ignore_index, "focal")
    # -expm1(log p) is 1 - p without cancellation. The clamp keeps the base > 0: at p_t = 1
    # (reached in float32 by confident pixels, and by ignored ones reading class 0)
    # d(1-p)^gamma/dp is infinite for gamma < 1, and inf * 0 would put NaN in the gradient.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(x.dtype).tiny)
    per_pixel = one_minus_p**gamma * -log_p
    return _weighted_sums(per_pixel, valid, _class_weight(weight, x.shape[1], safe, x))


# Softmax focal loss (Lin et al. 2017): mean over valid pixels of (1 - p_t)^gamma * CE, weighted
# like `cross_entropy`, so gamma = 0 gives exactly the cross-entropy.
focal_loss = Loss(_focal_sums, _weighted_mean)


def _binary(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 1, ...) logits -> logit, valid mask and float target (0 at ignored pixels), (B, ...)."""
    if logits.ndim < 2 or logits.shape[1] != 1:
        raise ValueError(
            f"binary losses need logits of shape (B, 1, ...), got {tuple(logits.shape)}")
    x, valid, safe = _prepare(logits, target, ignore_index)
    return x[:, 0], valid, safe.to(x.dtype)


def _bce_sums(logits: Tensor, target: Tensor, *, ignore_index: int = 255) -> dict[str, Tensor]:
    x, valid, y = _binary(logits, target, ignore_index)
    return _weighted_sums(F.binary_cross_entropy_with_logits(x, y, reduction="none"), valid)


# Mean binary cross-entropy over valid pixels. target holds 0, 1 or ignore_index; other values
# are not checked (that would need a host sync).
bce_with_logits = Loss(_bce_sums, _weighted_mean)


def _bce_soft_iou_sums(logits: Tensor, target: Tensor, *, ignore_index: int = 255,
                       eps: float = 1e-7) -> dict[str, Tensor]:
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    x, valid, y = _binary(logits, target, ignore_index)
    sums = _weighted_sums(F.binary_cross_entropy_with_logits(x, y, reduction="none"), valid)
    # Multiplying by the mask (not indexing) drops ignored pixels from both sums, gradient included.
    p = torch.sigmoid(x) * valid
    return {**sums, "intersection": (p * y).sum(), "union": (p + y - p * y).sum()}


def _bce_soft_iou_reduce(sums: dict[str, Tensor], *, eps: float = 1e-7, **_) -> Tensor:
    iou = (sums["intersection"] + eps) / (sums["union"] + eps)
    return _weighted_mean(sums) + 1 - iou


# BCE + (1 - soft IoU) of the sigmoid probabilities, over the valid pixels of the whole batch:
# soft IoU = (sum p*y + eps) / (sum p + y - p*y + eps), as in the UNet notebook this project
# started from. eps only settles the empty case: no valid pixels gives IoU 1, so the loss is 0.
bce_soft_iou = Loss(_bce_soft_iou_sums, _bce_soft_iou_reduce)


def _dice_sums(logits: Tensor, target: Tensor, *, ignore_index: int = 255, eps: float = 1.0
               ) -> dict[str, Tensor]:
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
    return {"intersection": (probs * onehot).sum(dims),
            "cardinality": probs.sum(dims) + onehot.sum(dims)}


def _dice_reduce(sums: dict[str, Tensor], *, eps: float = 1.0, **_) -> Tensor:
    return 1 - ((2 * sums["intersection"] + eps) / (sums["cardinality"] + eps)).mean()


# Soft Dice loss, 1 - mean over classes of (2 sum p*y + eps) / (sum p + sum y + eps). Sums run
# over the valid pixels of the whole batch. One channel: sigmoid probabilities of the foreground
# (target 0 / 1), Dice of that class only. C > 1 channels: softmax, every class. eps > 0 gives a
# class absent from target and prediction a Dice of 1, and an all-ignored batch a loss of 0.
dice_loss = Loss(_dice_sums, _dice_reduce)


def head_losses(outputs: dict, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                aux_weight: float) -> dict[str, Tensor]:
    """{"loss": the objective, "loss_main": loss_fn(outputs["out"]), and "loss_aux":
    loss_fn(outputs["aux"]) when it counts}; loss = loss_main + aux_weight * loss_aux.

    The auxiliary term is left out when the model has no "aux" head or aux_weight is 0.
    """
    if "out" not in outputs:
        raise ValueError(f"outputs must have an 'out' entry, got keys {sorted(outputs)}")
    if aux_weight < 0:
        raise ValueError(f"loss.aux_weight must be >= 0, got {aux_weight}")
    main = loss_fn(outputs["out"], target)
    if not aux_weight or outputs.get("aux") is None:
        return {"loss": main, "loss_main": main}
    aux = loss_fn(outputs["aux"], target)
    return {"loss": main + aux_weight * aux, "loss_main": main, "loss_aux": aux}


def total_loss(outputs: dict, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
               aux_weight: float) -> Tensor:
    """loss_fn(outputs["out"]) + aux_weight * loss_fn(outputs["aux"]) (see `head_losses`)."""
    return head_losses(outputs, target, loss_fn, aux_weight)["loss"]


def build(loss_cfg, num_classes: int, class_weights: tuple[float, ...] | None = None) -> Loss:
    """The Loss (logits, target) -> loss from a config with fields name, gamma, class_weights
    (a tuple, empty for none), class_balance and ignore_index. class_weights: weights measured
    on the data for loss.class_balance (seg.data.balance); without them the check of
    class_balance is all that is done with it."""
    name, weights = loss_cfg.name, tuple(loss_cfg.class_weights)
    names = sorted(BINARY_LOSSES | _MULTICLASS_LOSSES)
    if name not in names:
        raise ValueError(f"loss.name must be one of {names}, got {name!r}")
    balance = loss_cfg.get("class_balance", "")
    if balance not in ("", "median_frequency"):
        raise ValueError(f"loss.class_balance={balance!r} is not one of '', 'median_frequency'")
    if balance and weights:
        raise ValueError("loss.class_balance and loss.class_weights both give class weights: "
                         "set one of them")
    weights = tuple(class_weights) if class_weights is not None else weights
    if name in BINARY_LOSSES and num_classes != 2:
        raise ValueError(f"loss.name={name!r} is a binary loss (one logit): it needs "
                         f"data.num_classes=2, got {num_classes}")
    if weights and name not in _WEIGHTED_LOSSES:
        raise ValueError(f"class weights (loss.class_weights / class_balance) are not supported "
                         f"by loss {name!r}")
    if weights and len(weights) != num_classes:
        raise ValueError(f"loss.class_weights must have data.num_classes={num_classes} "
                         f"entries, got {weights}")
    ignore = {"ignore_index": loss_cfg.ignore_index}
    weight = {"weight": torch.tensor(weights, dtype=torch.float32) if weights else None}
    if name == "cross_entropy":
        return cross_entropy.bind(**ignore, **weight)
    if name == "focal":
        return focal_loss.bind(gamma=loss_cfg.gamma, **ignore, **weight)
    unweighted = {"bce": bce_with_logits, "bce_soft_iou": bce_soft_iou, "dice": dice_loss}
    return unweighted[name].bind(**ignore)
