"""Paired comparisons of two systems evaluated on the same images, with bootstrap intervals.

A difference in mIoU between two runs, or two ablation variants, means little without its
uncertainty: seed-to-seed spreads of a few thousandths are as large as many reported effects.
The method is the paired bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap",
1993; used to compare systems evaluated on one test set by Koehn, EMNLP 2004, and
Berg-Kirkpatrick et al., EMNLP 2012):

- resample the evaluated images with replacement, the SAME images for both systems (pairing
  cancels what the images have in common: some are hard for every model);
- recompute each system's split-level metric on the resample from the summed per-image counts
  (`seg.metrics.count_scores`: the mIoU of the resampled split, not a mean of per-image IoUs);
- with several seeds per system, also resample each system's seeds with replacement and average
  the metric over them (a two-level bootstrap), so the interval covers seed-to-seed variation;
- repeat; the 2.5th and 97.5th percentiles of the differences are the 95% interval, and the
  fraction of resamples whose difference has the other sign than the observed one says how
  often the ordering flips.

Per-image counts come from the run directory (`<workdir>/per_image/<split>.npz`, written by
every evaluation with config.eval.per_image).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import torch

from seg import metrics, rundir
from seg.errors import ConfigError

METRICS = ("miou", "pixel_acc", "mean_acc")
_CHUNK = 1000  # resamples per matrix product: bounds the memory of large splits


class Comparison(NamedTuple):
    metric: str
    a: float                 # the metric of system A on all images, averaged over its seeds
    b: float
    diff: float              # b - a
    low: float               # the interval of b - a
    high: float
    level: float             # e.g. 0.95
    sign_flips: float        # fraction of resamples whose difference has the other sign
    images: int
    seeds_a: int
    seeds_b: int
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def line(self, name_a: str = "A", name_b: str = "B") -> str:
        return (f"{self.metric}: {name_b} {self.b:.4f} - {name_a} {self.a:.4f} = "
                f"{self.diff:+.4f}, {self.level:.0%} interval [{self.low:+.4f}, "
                f"{self.high:+.4f}]{' *' if self.excludes_zero else ''}, sign flips in "
                f"{self.sign_flips:.1%} of {self.resamples} resamples ({self.images} images, "
                f"{self.seeds_a} vs {self.seeds_b} seeds)")


def paired_bootstrap(a: Sequence[rundir.PerImage], b: Sequence[rundir.PerImage],
                     metric: str = "miou", resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> Comparison:
    """Compares B against A: each a list of per-image results, one per seed, all on the same
    images."""
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r} is not one of {METRICS}")
    if not 0 < level < 1 or resamples < 1:
        raise ConfigError(f"level={level} must be in (0, 1) and resamples={resamples} >= 1")
    counts_a, counts_b = _counts(a, b)
    n = counts_a.shape[1]
    g = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, _CHUNK):
        r = min(_CHUNK, resamples - start)
        weights = torch.from_numpy(g.multinomial(n, np.full(n, 1.0 / n), size=r)).double()
        values = [_seed_mean(_metric(weights, c, metric), g) for c in (counts_a, counts_b)]
        diffs.append(values[1] - values[0])
    diffs = torch.cat(diffs).numpy()
    full = torch.ones(1, n, dtype=torch.float64)
    value_a, value_b = (float(_metric(full, c, metric).mean()) for c in (counts_a, counts_b))
    observed = value_b - value_a
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Comparison(metric, value_a, value_b, observed, float(low), float(high), level,
                      float(np.mean(np.sign(diffs) != np.sign(observed))), n, len(a), len(b),
                      resamples)


def _counts(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """(seeds, images, K, 3) float64 counts of each side, after checking that every run was
    evaluated on the same images of the same split with the same classes."""
    runs = [*a, *b]
    if not a or not b:
        raise ConfigError("a comparison needs at least one run on each side")
    first = runs[0]
    for run in runs[1:]:
        same = (run.split == first.split and run.class_names == first.class_names
                and np.array_equal(run.index, first.index)
                and np.array_equal(run.source, first.source))
        if not same:
            raise ConfigError(f"the runs were not evaluated on the same images (split "
                              f"{first.split!r}, {len(first.index)} images vs split "
                              f"{run.split!r}, {len(run.index)} images)")
    stack = lambda side: torch.from_numpy(np.stack([r.counts for r in side])).double()
    return stack(a), stack(b)


def _metric(weights: torch.Tensor, counts: torch.Tensor, metric: str) -> torch.Tensor:
    """(seeds, resamples): the metric of each seed on each resample (image weights)."""
    summed = torch.einsum("rn,snkc->srkc", weights, counts)
    return metrics.count_scores(summed)[metric]


def _seed_mean(values: torch.Tensor, g: np.random.Generator) -> torch.Tensor:
    """(resamples,): each resample's mean over seeds drawn with replacement (all seeds when
    there is one)."""
    seeds, r = values.shape
    if seeds == 1:
        return values[0]
    drawn = torch.from_numpy(g.integers(0, seeds, size=(r, seeds)))
    return values.T.gather(1, drawn).mean(1)


def load(workdirs: Sequence[str | os.PathLike], split: str = "val",
         name: str | None = None) -> list[rundir.PerImage]:
    """The per-image results of `split` of each run directory (the loop's latest eval, or
    evaluate.py's `name`, e.g. "eval_test_tta")."""
    found = []
    for workdir in workdirs:
        path = rundir.RunDir(workdir).per_image_file(name or split)
        if not path.exists():
            raise ConfigError(f"{path} does not exist: evaluate {workdir} with "
                              "config.eval.per_image=True (the default) first")
        found.append(rundir.load_per_image(path))
    return found


def compare_runs(a: Sequence, b: Sequence, split: str = "val", metrics_: Sequence[str] = (
        "miou", "pixel_acc"), **options) -> list[Comparison]:
    """B's run directories (its seeds) against A's, on `split`, for each metric."""
    runs_a, runs_b = load(a, split), load(b, split)
    return [paired_bootstrap(runs_a, runs_b, m, **options) for m in metrics_]
