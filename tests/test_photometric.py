"""seg.data.photometric: mmsegmentation's PhotoMetricDistortion, step by step, against the
standard library's HSV conversion (colorsys) and hand arithmetic."""
from __future__ import annotations

import colorsys

import pytest
import torch
from torchvision import tv_tensors

from seg.data import photometric


def image(seed=0, h=6, w=7):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def hsv_reference(x: torch.Tensor, saturation=1.0, hue_shift=0.0) -> torch.Tensor:
    """Per pixel through colorsys (float64): S times `saturation` capped at 1, H plus
    `hue_shift` turns; values on the 0-255 scale."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*(x[:, i, j].double() / 255).tolist())
            out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + hue_shift) % 1.0,
                                                            min(s * saturation, 1.0), v)) * 255
    return out


def test_brightness_and_contrast_clip_then_truncate_by_hand():
    x = torch.tensor([100, 250, 10, 0], dtype=torch.uint8).view(1, 1, 4).repeat(3, 1, 1)
    assert photometric.affine(x, beta=20.7)[0, 0].tolist() == [120, 255, 30, 20]
    assert photometric.affine(x, beta=-20.7)[0, 0].tolist() == [79, 229, 0, 0]
    assert photometric.affine(x, alpha=1.45)[0, 0].tolist() == [145, 255, 14, 0]


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.3, 1.5])
def test_saturation_is_hsv_saturation_scaled(factor):
    x = image()
    # float32 arithmetic on values up to 255 against float64: a few ulp of 255
    torch.testing.assert_close(photometric.saturate(x.float(), factor).double(),
                               hsv_reference(x, saturation=factor), rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps", [-18, -5, 7, 17])
def test_hue_steps_are_two_degrees(steps):
    x = image(1)
    params = dict(brightness=None, contrast=None, saturation=None, hue=steps,
                  contrast_last=False)
    out = photometric.PhotoMetricDistortion().transform(tv_tensors.Image(x), params)
    # one rounding to uint8 at the end: within half a level, plus float32 noise
    reference = hsv_reference(x, hue_shift=steps / 180)
    assert (out.double() - reference).abs().max() <= 0.5 + 1e-3


@pytest.mark.parametrize("contrast_last", [False, True])
def test_steps_run_in_order_with_contrast_second_or_last(contrast_last):
    x = image(2)
    params = dict(brightness=-12.5, contrast=1.3, saturation=0.7, hue=None,
                  contrast_last=contrast_last)
    out = photometric.PhotoMetricDistortion().transform(tv_tensors.Image(x), params)
    y = photometric.affine(x, beta=-12.5)
    if not contrast_last:
        y = photometric.affine(y, alpha=1.3)
    y = photometric.saturate(y.float(), 0.7).round().clamp(0, 255).to(torch.uint8)
    if contrast_last:
        y = photometric.affine(y, alpha=1.3)
    assert torch.equal(out, y) and isinstance(out, tv_tensors.Image)


def test_draws_cover_every_step_and_masks_pass_through():
    t, x = photometric.PhotoMetricDistortion(), image(3)
    mask = tv_tensors.Mask(torch.randint(0, 3, (6, 7), dtype=torch.uint8))
    seen = {k: set() for k in ("brightness", "contrast", "saturation", "hue")}
    torch.manual_seed(0)
    for _ in range(64):
        params = t.make_params([tv_tensors.Image(x), mask])
        for k in seen:
            seen[k].add(params[k] is None)
        assert params["brightness"] is None or -32 <= params["brightness"] <= 32
        assert params["contrast"] is None or 0.5 <= params["contrast"] <= 1.5
        assert params["hue"] is None or -18 <= params["hue"] < 18
    assert all(s == {True, False} for s in seen.values())
    out_image, out_mask = t(tv_tensors.Image(x), mask)
    assert torch.equal(out_mask, mask) and out_image.dtype == torch.uint8
