"""Prediction pictures: label maps coloured with a palette, tiled as image | truth | prediction.

Everything works on uint8 tensors (3, H, W), the layout torchvision.io.write_png takes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from seg.data.voc import voc_palette

# PASCAL VOC's colour for its void label (255): light, unsaturated, and none of the first 255
# default class colours.
IGNORE_COLOUR = (224, 224, 192)


def default_palette(num_classes: int) -> Tensor:
    """(K, 3) uint8: PASCAL VOC's colour map, for datasets without a palette of their own."""
    return torch.tensor(voc_palette(num_classes), dtype=torch.uint8).view(num_classes, 3)


def palette_tensor(palette: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """A dataset's palette as (K, 3) uint8; the default palette when the dataset has none."""
    if not palette:
        return default_palette(num_classes)
    colours = torch.tensor(palette, dtype=torch.int64)
    if colours.ndim != 2 or colours.shape[1] != 3 or colours.shape[0] < num_classes:
        raise ValueError(f"palette must hold an RGB triple for each of the {num_classes} "
                         f"classes, got shape {tuple(colours.shape)}")
    if colours.min() < 0 or colours.max() > 255:
        raise ValueError("palette values must be in [0, 255]")
    return colours[:num_classes].to(torch.uint8)


def colorize(labels: Tensor, palette: Tensor, ignore_index: int = 255) -> Tensor:
    """Integer labels (..., H, W) -> uint8 colours (..., 3, H, W). `ignore_index` (and any label
    outside the palette) is drawn in IGNORE_COLOUR."""
    table = torch.cat([palette.to(torch.uint8), torch.tensor([IGNORE_COLOUR], dtype=torch.uint8)])
    table = table.to(labels.device)
    k = palette.shape[0]
    labels = labels.long()
    index = torch.where((labels >= 0) & (labels < k) & (labels != ignore_index), labels, k)
    return table[index].movedim(-1, -3)


def unnormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised float images (..., 3, H, W) -> uint8, inverting (x / 255 - mean) / std."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    pixels = (images.float() * std_t + mean_t) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8)


def grid(rows: Sequence[Sequence[Tensor]], pad: int = 2, fill: int = 255) -> Tensor:
    """Tiles (3, h, w) uint8 pictures, row by row, left-aligned, `pad` pixels of `fill` around
    and between them; each row is as tall as its tallest picture (sizes may differ)."""
    if not rows or not all(rows):
        raise ValueError("grid needs at least one picture in every row")
    heights = [max(p.shape[-2] for p in row) for row in rows]
    widths = [sum(p.shape[-1] for p in row) + pad * (len(row) - 1) for row in rows]
    device = rows[0][0].device
    canvas = torch.full((3, sum(heights) + pad * (len(rows) + 1), max(widths) + 2 * pad), fill,
                        dtype=torch.uint8, device=device)
    y = pad
    for row, height in zip(rows, heights):
        x = pad
        for picture in row:
            h, w = picture.shape[-2:]
            canvas[:, y:y + h, x:x + w] = picture
            x += w + pad
        y += height + pad
    return canvas


def prediction_rows(images: Tensor, masks: Tensor, preds: Tensor, palette: Tensor,
                    ignore_index: int = 255) -> list[list[Tensor]]:
    """[image, ground truth, prediction] per sample. images uint8 (B, 3, H, W), masks and preds
    integer (B, H, W)."""
    truth = colorize(masks, palette, ignore_index)
    predicted = colorize(preds, palette, ignore_index)
    return [[images[i], truth[i], predicted[i]] for i in range(images.shape[0])]


def prediction_grid(images: Tensor, masks: Tensor, preds: Tensor, palette: Tensor,
                    ignore_index: int = 255) -> Tensor:
    """One row per sample: image | ground truth | prediction (see `prediction_rows`)."""
    return grid(prediction_rows(images, masks, preds, palette, ignore_index))
