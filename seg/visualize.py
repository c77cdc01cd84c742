"""Prediction pictures: label maps coloured with a palette, tiled as image | truth | prediction,
upscaled when small, with column titles and a legend of the classes shown.

Everything works on uint8 tensors (3, H, W), the layout torchvision.io.write_png takes; text is
drawn with PIL's built-in default font (no font file, nothing downloaded).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from seg.data.voc import voc_palette

# PASCAL VOC's colour for its void label (255): light, unsaturated, and none of the first 255
# default class colours.
IGNORE_COLOUR = (224, 224, 192)
# Panels are enlarged by a whole factor (nearest neighbour: every pixel becomes a square, labels
# stay crisp) until their longer side reaches this: a 64x64 image is shown at 256x256.
LEGIBLE_SIDE = 256
TEXT_SIZE = 14          # pixels, for titles and legend entries
PAD = 2                 # pixels between panels


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


# ---------------------------------------------------------------- pictures a person can read

class Picture(NamedTuple):
    """A finished picture and where its panels are: cells[row][col] = (y, x, h, w) in pixels."""
    pixels: Tensor
    cells: list[list[tuple[int, int, int, int]]]


def upscale_factor(height: int, width: int, side: int = LEGIBLE_SIDE) -> int:
    """The whole factor that brings the longer side of a panel to at least `side` (1 if it is
    there already)."""
    return max(1, -(-side // max(height, width, 1)))


def upscale(picture: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour enlargement by a whole factor: each pixel becomes factor x factor."""
    if factor == 1:
        return picture
    return picture.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def blend(image: Tensor, colours: Tensor, alpha: float = 0.5) -> Tensor:
    """The label colours laid over the image with opacity `alpha` (uint8 in and out)."""
    mixed = image.float() * (1 - alpha) + colours.float() * alpha
    return mixed.round().clamp(0, 255).to(torch.uint8)


def labelled_grid(rows: Sequence[Sequence[Tensor]], titles: Sequence[str],
                  legend: Sequence[tuple[str, Sequence[int]]], side: int = LEGIBLE_SIDE
                  ) -> Picture:
    """Panels (3, h, w) uint8 tiled as `grid` does, all enlarged by the factor the largest one
    needs to be legible, under a row of column titles and over a legend of (name, colour)
    entries wrapped to the picture's width."""
    factor = upscale_factor(max(p.shape[-2] for row in rows for p in row),
                            max(p.shape[-1] for row in rows for p in row), side)
    rows = [[upscale(p, factor) for p in row] for row in rows]
    body = grid(rows, pad=PAD)
    font = _font()
    line = _text_height(font)
    header = line + 2 * PAD if titles else 0
    width = body.shape[-1]
    entries, legend_height = _legend_layout(legend, font, width, line)
    canvas = Image.new("RGB", (width, header + body.shape[-2] + legend_height), "white")
    canvas.paste(Image.fromarray(body.permute(1, 2, 0).cpu().numpy()), (0, header))
    draw = ImageDraw.Draw(canvas)
    cells, y = [], header + PAD
    for row in rows:
        x, cell_row = PAD, []
        for p in row:
            cell_row.append((y, x, p.shape[-2], p.shape[-1]))
            x += p.shape[-1] + PAD
        cells.append(cell_row)
        y += max(p.shape[-2] for p in row) + PAD
    for (_, x, _, w), title in zip(cells[0], titles):  # centred over the first row's panels
        draw.text((x + (w - draw.textlength(title, font=font)) / 2, PAD), title, fill="black",
                  font=font)
    top = header + body.shape[-2]
    for (ex, ey), (name, colour) in zip(entries, legend):
        draw.rectangle([ex, top + ey, ex + line - 1, top + ey + line - 1],
                       fill=tuple(int(c) for c in colour), outline="black")
        draw.text((ex + line + PAD * 2, top + ey), name, fill="black", font=font)
    pixels = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()
    return Picture(pixels, cells)


def legend_entries(labels: Sequence[Tensor], class_names: Sequence[str], palette: Tensor,
                   ignore_index: int = 255) -> list[tuple[str, tuple[int, ...]]]:
    """(name, colour) of each class that occurs in any of `labels`, in class order; the
    ignore label, when present, last, in IGNORE_COLOUR."""
    present = set()
    for t in labels:
        present |= set(torch.unique(t).tolist())
    entries = [(name, tuple(palette[k].tolist())) for k, name in enumerate(class_names)
               if k in present]
    if ignore_index in present:
        entries.append(("ignore", IGNORE_COLOUR))
    return entries


def prediction_picture(images: Sequence[Tensor], masks: Sequence[Tensor],
                       preds: Sequence[Tensor], palette: Tensor, class_names: Sequence[str],
                       ignore_index: int = 255) -> Picture:
    """The training-time picture: one row per sample, image | ground truth | prediction, titled,
    enlarged when small, with a legend of the classes shown. Samples (uint8 (3, H, W) images,
    (H, W) labels: a batch, or a list of any sizes)."""
    rows = [[image, colorize(mask, palette, ignore_index), colorize(pred, palette, ignore_index)]
            for image, mask, pred in zip(images, masks, preds)]
    legend = legend_entries([*masks, *preds], class_names, palette, ignore_index)
    return labelled_grid(rows, ("image", "ground truth", "prediction"), legend)


def overlay_picture(image: Tensor, pred: Tensor, palette: Tensor, class_names: Sequence[str],
                    alpha: float = 0.5) -> Picture:
    """What predict writes next to each mask: image | prediction laid over it, titled, enlarged
    when small, with a legend of the classes predicted."""
    colours = colorize(pred, palette)
    legend = legend_entries([pred], class_names, palette)
    return labelled_grid([[image, blend(image, colours, alpha)]], ("image", "prediction"),
                         legend)


def _font():
    try:  # a scalable built-in font where PIL has FreeType (Pillow >= 10.1), else its bitmap one
        return ImageFont.load_default(size=TEXT_SIZE)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return max(bottom, TEXT_SIZE) + 1


def _legend_layout(legend, font, width: int, line: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corners of the legend entries (swatch, gap, name), wrapped to `width`, and the
    legend's height."""
    corners, x, y = [], PAD, PAD
    for name, _ in legend:
        w = line + 2 * PAD + int(font.getlength(name)) + 4 * PAD
        if x > PAD and x + w > width:
            x, y = PAD, y + line + PAD
        corners.append((x, y))
        x += w
    return corners, (y + line + PAD if legend else 0)
