"""The embedded default dataset: procedurally generated scenes, no files, no downloads.

Object classes differ by shape family and texture family only. Every colour (background,
clutter, object, occluder) is drawn from the same uniform RGB distribution, so the colour of a
pixel says nothing about its class. Scenes have a shaded, noisy background with plain clutter
blobs and strokes (background class), 0-4 objects that overlap (later ones hide earlier ones)
and may leave the frame, thin background-class bars drawn over the objects, and an ignore band
on every boundary between two labels, like the Oxford-IIIT Pet trimaps.

Images are drawn in fixed-size chunks, each from its own generator seeded by
(seed, split, chunk), so image i of a split does not depend on how many images were asked for.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.data.dataset import DatasetInfo, SegDataset

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
CLASS_NAMES = ("background", "striped_blob", "patterned_polygon", "blotched_ring", "chevron_cross")
# for pictures only: the images' own colours carry no class information
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200))

_CHUNK = 32              # images per generator; a constant so that splits are prefix-stable
_MAX_OBJECTS = 4
_OBJECT_COUNT_PROBS = (0.02, 0.18, 0.30, 0.28, 0.22)   # 0..4 objects; empty scenes are rare
_STATS_IMAGES = 256      # train images the normalisation statistics are measured on
_TWO_PI = 2 * math.pi


@dataclass(frozen=True, eq=False)   # eq on tensors would be ambiguous; identity is enough
class SegmentationData(SegDataset):
    """A whole split held in memory; a SegDataset (read(i) returns views, no copies)."""
    images: Tensor                      # (N, 3, H, W) uint8
    masks: Tensor                       # (N, H, W) uint8 class indices, ignore_index on borders
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]    # per-channel statistics of the train split, 0-1 scale
    std: tuple[float, float, float]
    ignore_index: int

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo("synthetic", tuple(self.class_names), self.ignore_index,
                           tuple(self.mean), tuple(self.std),
                           PALETTE[:len(self.class_names)])

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.masks[i]


def stable_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings; stable across processes (no hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded with stable_seed(*parts)."""
    return torch.Generator().manual_seed(stable_seed(*parts))


def generate(split: str, num_images: int, image_size: int | tuple[int, int] = 64,
             num_classes: int = 3, seed: int = 0, border: int = 1) -> SegmentationData:
    """Generates one split. `border`: half-width in pixels of the ignore band (0 = none)."""
    h, w = _check_args(split, num_images, image_size, num_classes, border)
    images, labels = _draw(split, num_images, h, w, num_classes, seed)
    if split == "train" and num_images >= _STATS_IMAGES:
        reference = images[:_STATS_IMAGES]
    else:
        reference = _draw("train", _STATS_IMAGES, h, w, num_classes, seed)[0]
    mean, std = _channel_stats(reference)
    return SegmentationData(images, ignore_band(labels, border), CLASS_NAMES[:num_classes],
                            mean, std, IGNORE_INDEX)


def ignore_band(labels: Tensor, border: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Marks `ignore_index` wherever a (2*border+1)^2 window holds more than one label.

    Both sides of a boundary are marked; the frame edge is not a boundary.
    """
    if border == 0:
        return labels
    x = labels[:, None].float()
    hi = F.max_pool2d(x, 2 * border + 1, stride=1, padding=border)
    lo = -F.max_pool2d(-x, 2 * border + 1, stride=1, padding=border)
    return torch.where((hi != lo)[:, 0], ignore_index, labels)


def _check_args(split, num_images, image_size, num_classes, border) -> tuple[int, int]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes={num_classes} must be in [2, {len(CLASS_NAMES)}]")
    if num_images < 0:
        raise ValueError(f"num_images={num_images} must be >= 0")
    if border < 0:
        raise ValueError(f"border={border} must be >= 0")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"image_size={image_size!r} must be an int or (height, width), >= 16")
    return size


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.transpose(0, 1).reshape(3, -1).double() / 255
    return tuple(x.mean(1).tolist()), tuple(x.std(1, unbiased=False).tolist())


def _draw(split, num_images, h, w, num_classes, seed) -> tuple[Tensor, Tensor]:
    """(images uint8 (N,3,H,W), labels uint8 (N,H,W)) without the ignore band."""
    chunks = [_scene_chunk(seeded_generator("synthetic", seed, split, c), h, w, num_classes)
              for c in range(-(-num_images // _CHUNK))]
    if not chunks:
        return torch.zeros(0, 3, h, w, dtype=torch.uint8), torch.zeros(0, h, w, dtype=torch.uint8)
    images, labels = (torch.cat(t)[:num_images] for t in zip(*chunks))
    return images, labels


def _scene_chunk(g: torch.Generator, h: int, w: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """_CHUNK scenes painted back to front; every random draw comes from `g`."""
    n = _CHUNK
    ys = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
    img = _background(g, n, ys, xs)
    lab = torch.zeros(n, h, w, dtype=torch.uint8)
    _clutter(g, img, lab, ys, xs, _ellipse, num_params=5, slots=6, min_count=2)
    _clutter(g, img, lab, ys, xs, _stroke, num_params=8, slots=3, min_count=0, width=(0.8, 2.0))
    _paint_objects(g, img, lab, ys, xs, num_classes)
    # thin background-class occluders over the objects (bars, wobbly branches)
    _clutter(g, img, lab, ys, xs, _stroke, num_params=8, slots=2, min_count=0, width=(2.0, 4.0))
    img = img * _smooth_field(g, n, 1, h, w, 0.75, 1.25)   # illumination over everything
    img = img + torch.randn(img.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.06
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8), lab


def _background(g, n, ys, xs) -> Tensor:
    """Two-colour linear gradient plus low-frequency colour noise, (n, 3, H, W) floats."""
    c0, c1 = torch.rand(2, n, 3, 1, 1, generator=g)
    angle = torch.rand(n, 1, 1, generator=g) * _TWO_PI
    ramp = xs * angle.cos() + ys * angle.sin()
    ramp = ramp - ramp.amin((1, 2), keepdim=True)
    ramp = ramp / ramp.amax((1, 2), keepdim=True) * 0.6 * torch.rand(n, 1, 1, generator=g)
    noise = _smooth_field(g, n, 3, ys.shape[0], xs.shape[1], -0.15, 0.15)
    return c0 + (c1 - c0) * ramp[:, None] + noise


def _smooth_field(g, n, channels, h, w, lo, hi) -> Tensor:
    coarse = lo + (hi - lo) * torch.rand(n, channels, 4, 4, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _clutter(g, img, lab, ys, xs, region, num_params, slots, min_count, **kwargs) -> None:
    """Paints plain background-class regions of random colour, later slots on top."""
    n = img.shape[0]
    params = torch.rand(n, slots, num_params, generator=g)
    colours = torch.rand(n, slots, 3, 1, 1, generator=g)
    inside = _on_active(region, params, _active(g, n, slots, min_count, slots), ys, xs, **kwargs)
    for s in range(slots):
        # lerp with a 0/1 weight is exact and much faster than a broadcasting torch.where
        img.lerp_(colours[:, s], inside[:, s, None].float())
        lab.masked_fill_(inside[:, s], 0)


def _active(g, n, slots, lo, hi) -> Tensor:
    """(n, slots) bool: the first k slots are used, k uniform in [lo, hi]."""
    count = torch.randint(lo, hi + 1, (n, 1), generator=g)
    return torch.arange(slots) < count


def _on_active(region, params: Tensor, active: Tensor, ys, xs, **kwargs) -> Tensor:
    """(n, S, H, W) bool, evaluating region((m, P, 1, 1) params, ...) on the active slots only."""
    out = torch.zeros(*active.shape, ys.shape[0], xs.shape[1], dtype=torch.bool)
    out[active] = region(params[active][:, :, None, None], ys, xs, **kwargs)
    return out


def _ellipse(p, ys, xs) -> Tensor:
    """Plain background blobs, (m, H, W) bool from (m, 5, 1, 1) uniforms."""
    radius = (0.04 + 0.18 * p[:, 2]) * min(ys.shape[0], xs.shape[1])
    aspect = 1 + 2 * p[:, 4]
    su, sv = _rotate(xs - p[:, 0] * xs.shape[1], ys - p[:, 1] * ys.shape[0], p[:, 3] * _TWO_PI,
                     radius, radius / aspect)
    return su * su + sv * sv < 1


def _stroke(p, ys, xs, width) -> Tensor:
    """Straight or wobbly bars `width` (a range) pixels wide, (m, H, W) bool from (m, 8, 1, 1)."""
    size = min(ys.shape[0], xs.shape[1])
    dx, dy = xs - (p[:, 0] * 1.2 - 0.1) * xs.shape[1], ys - (p[:, 1] * 1.2 - 0.1) * ys.shape[0]
    length = (0.3 + 0.7 * p[:, 3]) * size
    along, across = _rotate(dx, dy, p[:, 2] * _TWO_PI)     # from the bar's middle
    half = (width[0] + (width[1] - width[0]) * p[:, 4]) / 2
    cycles = (0.5 + 1.5 * p[:, 6]) * _TWO_PI / length
    wobble = 0.05 * size * p[:, 5] * torch.sin(along * cycles + p[:, 7] * _TWO_PI)
    return ((across - wobble).abs() < half) & (along.abs() < length / 2)


def _rotate(dx: Tensor, dy: Tensor, angle: Tensor, scale_u=1.0, scale_v=1.0
            ) -> tuple[Tensor, Tensor]:
    """Coordinates along and across `angle`, over the scales. dx (.., 1, W) and dy (.., H, 1)
    keep the products small: each output costs one full-size add."""
    c, s = angle.cos(), angle.sin()
    return (c / scale_u) * dx + (s / scale_u) * dy, (c / scale_v) * dy - (s / scale_v) * dx


def _paint_objects(g, img, lab, ys, xs, num_classes) -> None:
    """0-4 textured objects per scene; a later slot hides an earlier one."""
    n, (h, w) = img.shape[0], img.shape[2:]
    probs = torch.tensor(_OBJECT_COUNT_PROBS)
    count = torch.multinomial(probs, n, replacement=True, generator=g)
    active = torch.arange(_MAX_OBJECTS) < count[:, None]
    cls = torch.randint(1, num_classes, (n, _MAX_OBJECTS), generator=g) * active
    params = torch.rand(n, _MAX_OBJECTS, 20, generator=g)
    # second colour = first shifted by 0.25-0.75 (mod 1) per channel: both stay uniform, so
    # colour is independent of class, and the texture never vanishes for lack of contrast
    first = torch.rand(n, _MAX_OBJECTS, 3, generator=g)
    second = torch.remainder(first + 0.25 + 0.5 * torch.rand(n, _MAX_OBJECTS, 3, generator=g), 1)
    colours = torch.stack([first, second], 2)
    inside = torch.zeros(n, _MAX_OBJECTS, h, w, dtype=torch.bool)
    pattern = torch.zeros(n, _MAX_OBJECTS, h, w)
    for c in range(1, num_classes):
        # each family is evaluated only on the slots of its class
        sel = cls == c
        inside[sel], pattern[sel] = _object(c, params[sel][:, :, None, None], ys, xs)
    for s in range(_MAX_OBJECTS):
        a, b = colours[:, s, 0, :, None, None], colours[:, s, 1, :, None, None]
        obj = a + (b - a) * pattern[:, s, None]
        img.lerp_(obj, inside[:, s, None].float())
        lab.copy_(torch.where(inside[:, s], cls[:, s, None, None].to(torch.uint8), lab))


def _object(cls: int, u: Tensor, ys: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    """Shape mask and texture pattern in [0, 1] for m objects of one class, each (m, H, W).

    u: (m, 20, 1, 1) uniforms. Columns 0-9 are shared (placement, size, pose, texture frame);
    the families read their own parameters from columns 10-19.
    """
    h, w = ys.shape[0], xs.shape[1]
    size = min(h, w)
    dx, dy = xs - (u[:, 0] * 1.2 - 0.1) * w, ys - (u[:, 1] * 1.2 - 0.1) * h
    radius = (0.14 + 0.18 * u[:, 2]) * size
    stretch = (1.6 ** (2 * u[:, 4] - 1)).sqrt()
    su, sv = _rotate(dx, dy, u[:, 3] * _TWO_PI, radius * stretch, radius / stretch)
    period = ((0.07 + 0.06 * u[:, 6]) * size).clamp(min=3.0)
    # the texture has its own orientation and a random phase (origin shift)
    tu, tv = _rotate(dx + u[:, 7] * 4 * period, dy + u[:, 8] * 4 * period, u[:, 5] * _TWO_PI)
    shape, texture = _FAMILIES[cls - 1]
    return shape(su, sv, u), texture(tu, tv, period, u)


def _blob(su, sv, u) -> Tensor:
    """Round shape with a smooth, wavy outline."""
    theta = torch.atan2(sv, su)
    outline = (1 + 0.25 * u[:, 10] * torch.sin(2 * theta + u[:, 11] * _TWO_PI)
               + 0.15 * u[:, 12] * torch.sin(3 * theta + u[:, 13] * _TWO_PI))
    return su * su + sv * sv < outline * outline


def _polygon(su, sv, u) -> Tensor:
    """Regular polygon (3-6 corners) or star with straight edges."""
    corners = 3 + (u[:, 10] * 4).floor()
    half = math.pi / corners                 # angle between a corner and the next edge midpoint
    outer = 1.2
    inner = torch.where(u[:, 11] < 0.4, outer * (0.35 + 0.25 * u[:, 12]), outer * half.cos())
    phi = torch.remainder(torch.atan2(sv, su), 2 * half)
    phi = torch.minimum(phi, 2 * half - phi)  # angle from the nearest corner
    # radius of the edge from the corner (outer, 0) to the inner vertex (inner, half)
    edge = outer * inner * half.sin() / (outer * phi.sin() + inner * (half - phi).sin())
    return su * su + sv * sv < edge * edge


def _ring(su, sv, u) -> Tensor:
    """Disc with an off-centre hole: an annulus when centred, a crescent when not."""
    offset, hole = 0.55 * u[:, 10], 0.35 + 0.25 * u[:, 11]
    return (su * su + sv * sv < 1) & ((su - offset) ** 2 + sv * sv > hole * hole)


def _cross(su, sv, u) -> Tensor:
    """Plus sign with arms of random length and thickness."""
    thick, long_u, long_v = 0.22 + 0.15 * u[:, 10], 0.8 + 0.3 * u[:, 11], 0.8 + 0.3 * u[:, 12]
    a, b = su.abs(), sv.abs()
    return ((a < long_u) & (b < thick)) | ((a < thick) & (b < long_v))


def _stripes(tu, tv, period, u) -> Tensor:
    # binary like the other textures: a soft wave would mix in intermediate colours, a colour cue
    return (torch.sin(tu / period * _TWO_PI) > 0).float()


def _checker_or_dots(tu, tv, period, u) -> Tensor:
    cell = 0.6 * period
    checker = torch.remainder((tu / cell).floor() + (tv / cell).floor(), 2)
    spacing = 1.3 * period
    fu = torch.remainder(tu / spacing, 1) - 0.5
    fv = torch.remainder(tv / spacing, 1) - 0.5
    dots = (fu * fu + fv * fv < 0.09).float()
    return torch.where(u[:, 9] < 0.5, checker, dots)


def _blotches(tu, tv, period, u) -> Tensor:
    """Irregular patches: the sign of three summed gratings of random direction and scale."""
    total = torch.zeros(())
    for i in range(3):
        direction = (i + 0.6 * u[:, 14 + i]) * _TWO_PI / 3
        along, _ = _rotate(tu, tv, direction)
        scale = period * (1.2 + 1.2 * u[:, 17 + i])
        total = total + torch.sin(along / scale * _TWO_PI)
    return (total > 0).float()


def _chevrons(tu, tv, period, u) -> Tensor:
    return (torch.remainder((tu + tv.abs()) / (1.2 * period), 1) < 0.5).float()


_FAMILIES = ((_blob, _stripes), (_polygon, _checker_or_dots), (_ring, _blotches),
             (_cross, _chevrons))
