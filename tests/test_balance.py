"""Median frequency class balancing (seg/data/balance.py) against a hand computation."""
from __future__ import annotations

import pytest
import torch

from conftest import palette_coded
from seg import errors, loop, losses
from seg.data import balance


def test_median_frequency_by_hand():
    # 4 classes (palette_coded), 2 images of 2x4, one ignored pixel (255); class 3 never appears
    a = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 255]], dtype=torch.uint8)   # 7 labelled pixels
    b = torch.tensor([[0, 0, 2, 2], [2, 2, 2, 2]], dtype=torch.uint8)     # 8 labelled pixels
    pixels, image_pixels = balance.class_frequencies(palette_coded([a, b]))
    assert pixels.tolist() == [7, 2, 6, 0] and image_pixels.tolist() == [15, 7, 8, 0]
    freq = [7 / 15, 2 / 7, 6 / 8]           # median: 7 / 15
    weights = balance.median_frequency_weights(palette_coded([a, b]))
    assert weights == pytest.approx([freq[0] / f for f in freq] + [0.0], rel=1e-12)


def test_a_run_trains_with_the_measured_weights(tmp_path, shared_synthetic_data, one_thread):
    from test_failures import tiny

    cfg = tiny()
    cfg.loss.class_balance = "median_frequency"
    summary = loop.train_and_evaluate(cfg, tmp_path / "w")
    from seg import data
    expected = balance.median_frequency_weights(data.build(cfg.data, "train"))
    assert summary["class_weights"] == pytest.approx(expected, rel=1e-12)
    assert min(expected) < 1 < max(expected)  # background is common, objects are rarer
    with pytest.raises(errors.ConfigError, match="set one of them"):
        cfg = tiny(**{"loss.class_weights": (1.0, 1.0, 1.0)})
        cfg.loss.class_balance = "median_frequency"
        loop.train_and_evaluate(cfg, tmp_path / "v")


def test_the_weights_reach_the_loss():
    import ml_collections
    cfg = ml_collections.ConfigDict({"name": "cross_entropy", "gamma": 2.0, "class_weights": (),
                                     "class_balance": "median_frequency", "ignore_index": 255})
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(1))
    weights = (0.5, 2.0, 1.0)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(weights))
    got = losses.build(cfg, 3, class_weights=weights)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
