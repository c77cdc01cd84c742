"""seg/compare.py: paired bootstrap intervals for the difference between two systems."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seg import compare, metrics, rundir
from seg.errors import ConfigError

K = 4


def _labels(n, seed, size=(12, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n, *size), generator=g)


def _predict(truth, error_rate, seed):
    """The truth with a fraction of pixels replaced by random labels."""
    g = torch.Generator().manual_seed(seed)
    wrong = torch.rand(truth.shape, generator=g) < error_rate
    return torch.where(wrong, torch.randint(0, K, truth.shape, generator=g), truth)


def _per_image(pred, truth, index=None) -> rundir.PerImage:
    counts = metrics.per_image_counts(pred, truth, K).numpy()
    index = np.arange(len(truth)) if index is None else index
    return rundir.PerImage(index, counts, np.array([""] * len(truth)), 10, "val",
                           tuple(f"c{k}" for k in range(K)))


def test_the_difference_is_the_split_level_difference_and_its_interval_covers_it():
    truth = _labels(40, 0)
    a, b = _predict(truth, 0.4, 1), _predict(truth, 0.3, 2)
    result = compare.paired_bootstrap([_per_image(a, truth)], [_per_image(b, truth)],
                                      resamples=2000)
    exact_a = metrics.scores(metrics.confusion_matrix(a, truth, K))["miou"]
    exact_b = metrics.scores(metrics.confusion_matrix(b, truth, K))["miou"]
    assert result.a == pytest.approx(exact_a, abs=1e-12)
    assert result.diff == pytest.approx(exact_b - exact_a, abs=1e-12) and result.diff > 0.05
    assert result.low < result.diff < result.high
    assert result.excludes_zero and result.sign_flips == 0  # 10 points of error, 40 images
    assert "*" in result.line()


def test_identical_runs_give_an_interval_at_zero():
    truth = _labels(20, 3)
    run = _per_image(_predict(truth, 0.3, 4), truth)
    result = compare.paired_bootstrap([run], [run], resamples=500)
    assert (result.diff, result.low, result.high, result.sign_flips) == (0.0, 0.0, 0.0, 0.0)
    assert not result.excludes_zero


def test_two_seeds_of_one_system_give_an_interval_around_zero():
    truth = _labels(60, 5)
    a = [_per_image(_predict(truth, 0.3, s), truth) for s in (6, 7)]
    b = [_per_image(_predict(truth, 0.3, s), truth) for s in (8, 9)]
    result = compare.paired_bootstrap(a, b, resamples=2000)
    assert result.low < 0 < result.high and (result.seeds_a, result.seeds_b) == (2, 2)
    assert 0.05 < result.sign_flips < 0.95


def test_intervals_cover_the_population_difference_about_95_percent_of_the_time():
    """The method itself: a population of 1500 images whose true mIoU difference is known;
    80 samples of 50 images each; the 95% intervals must cover the truth in about 95% of the
    samples (80 draws: 0.85 is more than 3 standard errors below 0.95)."""
    truth = _labels(1500, 10, size=(8, 8))
    a, b = _predict(truth, 0.45, 11), _predict(truth, 0.40, 12)
    true_diff = (metrics.scores(metrics.confusion_matrix(b, truth, K))["miou"]
                 - metrics.scores(metrics.confusion_matrix(a, truth, K))["miou"])
    g, covered = np.random.default_rng(13), 0
    for trial in range(80):
        pick = torch.from_numpy(g.choice(1500, 50, replace=False))
        result = compare.paired_bootstrap([_per_image(a[pick], truth[pick])],
                                          [_per_image(b[pick], truth[pick])],
                                          resamples=400, seed=trial)
        covered += result.low <= true_diff <= result.high
    assert covered / 80 >= 0.85


def test_runs_on_other_images_are_refused():
    truth = _labels(10, 14)
    run = _per_image(truth, truth)
    other = _per_image(truth, truth, index=np.arange(10) + 1)
    with pytest.raises(ConfigError, match="not evaluated on the same images"):
        compare.paired_bootstrap([run], [other])
    with pytest.raises(ConfigError, match="metric"):
        compare.paired_bootstrap([run], [run], metric="fwiou")


def test_report_compare_prints_the_difference_interval_and_sign_flips(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    truth = _labels(30, 20)
    for variant, rate in (("base", 0.4), ("better", 0.25)):
        for seed in (0, 1):
            run = rundir.RunDir(tmp_path / variant / f"seed{seed}")
            run.write_per_image("val", {"index": torch.arange(30), "counts": torch.from_numpy(
                _per_image(_predict(truth, rate, 100 * seed + int(rate * 100)), truth).counts)},
                step=10, split="val", sources=[""] * 30, class_names=[f"c{k}" for k in range(K)])
            run.write_summary({"steps": 10})
    proc = subprocess.run(
        [sys.executable, "experiments/report.py", "--compare", "--resamples=500",
         str(tmp_path / "base" / "seed*"), str(tmp_path / "better" / "seed*")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "better (2 runs) against base (2 runs), val split:"
    assert lines[1].startswith("  miou: better ") and "95% interval [+" in lines[1]
    assert lines[1].endswith("sign flips in 0.0% of 500 resamples (30 images, 2 vs 2 seeds)")
    assert lines[2].startswith("  pixel_acc: better ")
