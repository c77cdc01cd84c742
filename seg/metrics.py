"""Segmentation metrics, pure functions.

Two families (docs/design.md, "Metrics"):

* `confusion_matrix` + `scores`: the standard. Accumulate one (K, K) matrix over the whole split
  on device (rows = ground truth, cols = prediction, `ignore_index` excluded), read it once at log
  time with `scores`.
* `per_image_*(pred, target, num_classes, ignore_index=255, average="macro", reduce="mean")`:
  the per-image definition some notebooks use, offered under its own names because it is a different number
  from the split-level one (a small image weighs as much as a large one). Each image gets its own
  confusion matrix (ignored pixels excluded from prediction and target counts alike), then
  - average="macro": the mean of the per-class score over the classes present in that image's
    target (a class that is only predicted is not averaged in; its pixels still count as errors
    of the present classes);
  - average="micro": numerators and denominators pooled over all classes, then divided;
  - reduce over the batch: "none" -> (B,), "mean" -> nanmean, "sum" -> nansum.
  An image whose target is entirely ignore_index has no score: NaN under "none", skipped by
  "mean" and "sum" (a batch of only such images gives NaN for "mean" and 0 for "sum"). To average
  "sum" over a dataset, divide by the number of non-NaN images, not by the dataset length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_AVERAGES = ("macro", "micro")
_REDUCES = ("mean", "sum", "none")


def predict(logits: Tensor) -> Tensor:
    """(B, C, H, W) logits -> (B, H, W) int64 labels; a single channel is a binary logit."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def _check_labels(pred: Tensor, target: Tensor, num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )


def _flat_cell(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int
               ) -> tuple[Tensor, Tensor]:
    """Cell index t*K + p of each pixel, and the mask of pixels that belong in the matrix.

    A pixel is counted only if its target is not `ignore_index` and both labels lie in [0, K).
    Out-of-range labels must be masked on both sides: with t*K + p, a prediction of -1 would
    otherwise land in the previous row, silently corrupting a real cell.
    """
    t = target.long()
    p = pred.long()
    k = num_classes
    valid = (t != ignore_index) & (t >= 0) & (t < k) & (p >= 0) & (p < k)
    return t * k + p, valid


def _histogram(index: Tensor, valid: Tensor, size: int) -> Tensor:
    """Counts of `index` over [0, size) with invalid entries sent to one extra overflow bin.

    Not torch.bincount: its CUDA kernel reads self.min() and self.max() back to the host
    (aten/src/ATen/native/cuda/SummaryOps.cu, even when minlength is given) and its output length
    depends on the data, which breaks a torch.compile graph. scatter_add_ into a fixed-size buffer
    has neither problem.
    """
    index = torch.where(valid, index, size).reshape(-1)
    counts = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:size]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
                     ) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, cols = prediction, summed over all pixels.

    Pixels whose target is `ignore_index` are not counted. Neither are pixels with a label outside
    [0, K) in target or prediction: they fall in the overflow bin and are dropped, so they never
    touch a real cell. Dropping is silent (a check would need a host sync); out-of-range targets
    are caught loudly by the multi-class losses, whose gather fails on them.
    Sum the matrices of several batches to accumulate a split.
    """
    _check_labels(pred, target, num_classes)
    cell, valid = _flat_cell(pred, target, num_classes, ignore_index)
    k = num_classes
    return _histogram(cell, valid, k * k).reshape(k, k)


def scores(cm: Tensor) -> dict:
    """Every split-level metric (docs/design.md) of an accumulated confusion matrix, as Python
    floats and lists of floats (NaN where undefined).

    Reads the matrix back to the host: call it at log time, not per step.
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (K, K) matrix, got shape {tuple(cm.shape)}")
    cm = cm.detach().to("cpu", torch.float64)
    diag, rows, cols = cm.diagonal(), cm.sum(1), cm.sum(0)
    total = cm.sum()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    # 0/0 gives NaN in floating point: exactly "undefined" (class absent / nothing counted).
    pixel_acc = float(diag.sum() / total)
    acc = diag / rows
    iou = diag / (rows + cols - diag)
    # Precision is 0, not NaN, for a class that is in the ground truth but never predicted.
    precision = torch.where(cols > 0, diag / cols, torch.where(rows > 0, 0.0, nan))
    dice = 2 * diag / (rows + cols)
    # Classes without ground truth have zero weight; where() keeps their NaN IoU out of the sum.
    fwiou = float(torch.where(rows > 0, rows / total * iou, 0.0).sum()) if total > 0 else math.nan
    return {
        "pixel_acc": pixel_acc,
        "mean_acc": float(acc.nanmean()),
        "acc_per_class": acc.tolist(),
        "miou": float(iou.nanmean()),
        "iou_per_class": iou.tolist(),
        "fwiou": fwiou,
        # Per-class recall is acc_per_class (diag / rows), not repeated under a second name;
        # its macro mean is mean_acc. Pooled over classes, recall, precision and dice all reduce
        # to trace / sum (pixel_acc) for single-label predictions: each pixel is one TP or one
        # (FN, FP) pair. Both are kept under these names for readers that compare systems.
        "recall_macro": float(acc.nanmean()),
        "recall_micro": float(diag.sum() / rows.sum()),
        "precision_per_class": precision.tolist(),
        "precision_macro": float(precision.nanmean()),
        "precision_micro": float(diag.sum() / cols.sum()),
        "dice_per_class": dice.tolist(),
        "dice_macro": float(dice.nanmean()),
        "dice_micro": float(2 * diag.sum() / (rows.sum() + cols.sum())),
    }


def per_image_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
                     ) -> Tensor:
    """(B, K, 3) int64 per image and class: [true positives, ground-truth pixels, predicted
    pixels] (ignore excluded): the diagonal, row sums and column sums of each image's confusion
    matrix. Summed over any subset of images they give that subset's split-level IoU, accuracy,
    precision and Dice (`count_scores`), which is what paired comparisons resample."""
    cm = _per_image_cm(pred, target, num_classes, ignore_index)
    return torch.stack([cm.diagonal(dim1=1, dim2=2), cm.sum(2), cm.sum(1)], dim=-1)


def count_scores(counts: Tensor) -> dict[str, Tensor]:
    """miou, pixel_acc and mean_acc from summed counts (..., K, 3) of `per_image_counts`, batched
    over the leading dimensions; the same definitions as `scores` (a class absent from ground
    truth and prediction is NaN and left out of the means)."""
    counts = counts.to(torch.float64)
    tp, gt, pred = counts.unbind(-1)
    return {"miou": (tp / (gt + pred - tp)).nanmean(-1),
            "pixel_acc": tp.sum(-1) / gt.sum(-1),
            "mean_acc": (tp / gt).nanmean(-1)}


def _per_image_cm(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B, K, K) confusion matrices, one per image, from a single histogram."""
    _check_labels(pred, target, num_classes)
    if pred.ndim < 2:
        raise ValueError(f"pred must be batched (B, ...), got shape {tuple(pred.shape)}")
    k, b = num_classes, pred.shape[0]
    cell, valid = _flat_cell(pred, target, k, ignore_index)
    image = torch.arange(b, device=cell.device).view(-1, *([1] * (cell.ndim - 1)))
    return _histogram(image * k * k + cell, valid, b * k * k).reshape(b, k, k)


def _per_image(kind: str, pred, target, num_classes, ignore_index, average, reduce) -> Tensor:
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
    if reduce not in _REDUCES:
        raise ValueError(f"reduce must be one of {_REDUCES}, got {reduce!r}")
    cm = _per_image_cm(pred, target, num_classes, ignore_index).double()
    diag, rows, cols = cm.diagonal(dim1=1, dim2=2), cm.sum(2), cm.sum(1)
    num, den = {
        "iou": (diag, rows + cols - diag),
        "recall": (diag, rows),
        "precision": (diag, cols),
        "dice": (2 * diag, rows + cols),
    }[kind]
    if average == "micro":
        # Pooled over all classes, a class predicted but absent from the target included.
        per_image = num.sum(1) / den.sum(1)
    else:
        present = rows > 0
        # den == 0 with the class present only happens for precision (never predicted): 0.
        # den holds counts, so clamp_min(1) changes no nonzero value; it only avoids 0/0.
        per_class = torch.where(den > 0, num / den.clamp_min(1), 0.0)
        per_image = torch.where(present, per_class, 0.0).sum(1) / present.sum(1)
    # An image whose target is all ignore has no score (NaN); mean / sum skip it.
    if reduce == "mean":
        return per_image.nanmean()
    if reduce == "sum":
        return per_image.nansum()
    return per_image


def per_image_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255,
                  average: str = "macro", reduce: str = "mean") -> Tensor:
    """Per-image IoU; the contract is in the module docstring."""
    return _per_image("iou", pred, target, num_classes, ignore_index, average, reduce)


def per_image_recall(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255,
                     average: str = "macro", reduce: str = "mean") -> Tensor:
    """Per-image recall; micro recall is the image's pixel accuracy."""
    return _per_image("recall", pred, target, num_classes, ignore_index, average, reduce)


def per_image_precision(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255,
                        average: str = "macro", reduce: str = "mean") -> Tensor:
    """Per-image precision; a class in the target but never predicted scores 0."""
    return _per_image("precision", pred, target, num_classes, ignore_index, average, reduce)


def per_image_dice(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255,
                   average: str = "macro", reduce: str = "mean") -> Tensor:
    """Per-image Dice (F1)."""
    return _per_image("dice", pred, target, num_classes, ignore_index, average, reduce)
