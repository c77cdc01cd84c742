"""seg.inference: sliding windows and test-time augmentation against whole-image inference and
hand-built references."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from seg import inference, metrics


def int_images(b=2, h=11, w=13, seed=0):
    # Small integers: every sum and mean below is exact in float32, so "equal" can mean equal.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (b, 3, h, w), generator=g).float()


def conv_forward(kernel_size=3, out_channels=3, seed=1, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-2, 3, (out_channels, 3, kernel_size, kernel_size), generator=g).float()
    if symmetric:  # mirrored along W: the model commutes with a horizontal flip
        weight = weight + weight.flip(-1)
    return lambda x: F.conv2d(x, weight, padding=kernel_size // 2)


def test_window_starts_by_hand():
    assert inference.window_starts(10, 4, 3) == [0, 3, 6]
    assert inference.window_starts(11, 4, 3) == [0, 3, 6, 7]   # last one moved back to the border
    assert inference.window_starts(8, 8, 5) == [0]
    assert inference.window_starts(3, 4, 2) == [0]             # window shrinks to the image


@pytest.mark.parametrize("window", [(11, 13), (20, 30)])
def test_sliding_with_window_covering_the_image_is_whole_image(window):
    x, forward = int_images(), conv_forward()
    x = x + torch.rand(x.shape)  # not integers: the identity must hold for any values
    got = inference.logits_sliding(forward, x, window, (3, 3))
    assert torch.equal(got, forward(x))


@pytest.mark.parametrize("window, stride", [((4, 5), (2, 3)), ((3, 3), (3, 3)), ((6, 2), (1, 1)),
                                            ((11, 4), (5, 4))])
def test_sliding_equals_whole_for_a_pointwise_model(window, stride):
    x, forward = int_images(), conv_forward(kernel_size=1)
    assert torch.equal(inference.logits_sliding(forward, x, window, stride), forward(x))


def test_sliding_averages_overlapping_windows():
    # 6x6 image, 4x4 windows at stride 2: rows/cols start at 0 and 2, and overlap in 2..3.
    x, forward = int_images(1, 6, 6), conv_forward()
    starts = [0, 2]
    expected = torch.zeros(1, 3, 6, 6)
    for i, j in itertools.product(range(6), range(6)):
        covering = [forward(x[..., y:y + 4, xx:xx + 4])[..., i - y, j - xx]
                    for y in starts for xx in starts if y <= i < y + 4 and xx <= j < xx + 4]
        expected[..., i, j] = torch.stack(covering).mean(0)
    got = inference.logits_sliding(forward, x, (4, 4), (2, 2))
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, forward(x))  # a 3x3 conv sees the window border


@pytest.mark.parametrize("channels", [1, 3])
def test_flip_tta_of_a_flip_equivariant_model_is_no_tta(channels):
    x = int_images()
    forward = conv_forward(out_channels=channels, symmetric=True)
    assert torch.equal(forward(x.flip(-1)).flip(-1), forward(x))  # the premise
    probs = inference.tta(forward, x, scales=(1.0,), flip=True)
    assert torch.equal(probs, inference.probabilities(forward(x)))


def test_flip_tta_averages_the_mirrored_prediction():
    x, forward = int_images(), conv_forward()
    expected = (torch.softmax(forward(x), 1) + torch.softmax(forward(x.flip(-1)), 1).flip(-1)) / 2
    got = inference.tta(forward, x, flip=True)
    assert torch.allclose(got, expected, atol=1e-7)
    assert not torch.allclose(got, torch.softmax(forward(x), 1), atol=1e-3)


def test_single_scale_one_is_whole_image_probabilities():
    x, forward = int_images() + torch.rand(2, 3, 11, 13), conv_forward()
    assert torch.equal(inference.tta(forward, x, scales=(1.0,)), torch.softmax(forward(x), 1))


def test_multi_scale_is_the_mean_of_resized_probabilities():
    x, forward = torch.randn(2, 3, 16, 20), conv_forward()

    def at_scale(s):  # torchvision's bilinear resize (no antialias) as the reference
        size = [round(16 * s), round(20 * s)]
        logits = forward(TF.resize(x, size, antialias=False))
        return torch.softmax(TF.resize(logits, [16, 20], antialias=False), 1)

    expected = (at_scale(0.5) + at_scale(1.0) + at_scale(1.25)) / 3
    got = inference.tta(forward, x, scales=(0.5, 1.0, 1.25))
    assert got.shape == (2, 3, 16, 20)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(2, 16, 20), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_logits_of_averaged_probabilities_round_trip(channels):
    logits = torch.randn(2, channels, 5, 7) * 3
    p = inference.probabilities(logits)
    back = inference.probabilities(inference.logits_from_probabilities(p))
    assert torch.allclose(back, p, atol=1e-6)
    assert torch.equal(metrics.predict(inference.logits_from_probabilities(p)),
                       metrics.predict(logits))


def test_make_logits_fn_without_augmentation_returns_the_models_logits():
    x, forward = torch.randn(2, 3, 12, 12), conv_forward()
    assert torch.equal(inference.make_logits_fn("whole")(forward, x), forward(x))
    slide = inference.make_logits_fn("slide", window=(8, 8), stride=(4, 4))
    assert torch.equal(slide(forward, x), inference.logits_sliding(forward, x, (8, 8), (4, 4)))
    augmented = inference.make_logits_fn("slide", (8, 8), (4, 4), scales=(1.0, 0.5), flip=True)
    probs = inference.tta(lambda im: inference.logits_sliding(forward, im, (8, 8), (4, 4)), x,
                          (1.0, 0.5), flip=True)
    assert torch.equal(metrics.predict(augmented(forward, x)), probs.argmax(1))


def test_scale_to_fits_the_image_then_resizes_the_logits_back():
    """mmsegmentation's test Resize(keep_ratio) + resize of the logits to the image: 15 x 20
    in a (40, 24) box is scaled by min(40/20, 24/15) = 1.6 to 24 x 32."""
    x, forward = torch.randn(2, 3, 15, 20), conv_forward()
    expected = TF.resize(forward(TF.resize(x, [24, 32], antialias=False)), [15, 20],
                         antialias=False)   # torchvision's bilinear resize as the reference
    got = inference.make_logits_fn("whole", scale_to=(40, 24))(forward, x)
    assert got.shape == (2, 3, 15, 20)
    assert torch.allclose(got, expected, atol=1e-6)
    # an image that fits the box already is not resampled at all
    assert torch.equal(inference.make_logits_fn(scale_to=(20, 15))(forward, x), forward(x))
    # test-time augmentation runs on the fitted image
    flipped = inference.make_logits_fn(flip=True, scale_to=(40, 24))(forward, x)
    inner = inference.make_logits_fn(flip=True)
    assert torch.equal(flipped, TF.resize(inner(forward, TF.resize(x, [24, 32], antialias=False)),
                                          [15, 20], antialias=False))


@pytest.mark.parametrize("kwargs, field", [
    (dict(scale_to=(0, 8)), "eval.scale_to"),
    (dict(scale_to=(8,)), "eval.scale_to"),
    (dict(mode="tiles"), "eval.mode"),
    (dict(mode="slide", window=(8, 8), stride=(9, 4)), "eval.stride"),
    (dict(mode="slide", window=(0, 8), stride=(1, 1)), "eval.window"),
    (dict(scales=()), "eval.scales"),
    (dict(scales=(1.0, -0.5)), "eval.scales"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        inference.make_logits_fn(**kwargs)
