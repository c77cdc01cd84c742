"""What the training loop keeps besides the TrainState, each piece saving and restoring itself
(`state_dict()` / `load_state_dict()`), so that a checkpoint is one entry per piece and a resumed
run continues each of them exactly:

  LogWindow    the train metrics between two log lines, summed on the device
  Clock        train time (evaluation and checkpointing paused out), wall time, the time
               spent waiting for batches, and the time of each kind of pause
  EvalHistory  the last eval of each split and the best val eval (train.best_metric)
  DropoutRng   the global generators that dropout draws from, on every rank
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from seg import distributed

# rank r draws dropout masks from seed + r * this: rank 0 is the single-process run
RANK_SEED_STRIDE = 1_000_003


# Train-step metrics the log window does not average: the last value counts (learning rate, fp16
# loss scale), or the steps where a flag was set (fp16 overflows); "finite" marks skipped steps.
_LAST = ("lr", "loss_scale")
_COUNTED = ("overflow",)
_FLAGS = ("finite",)
# Record fields that measure time or memory: two runs of one config differ in these alone.
TIMING_KEYS = ("images_per_s", "step_s", "data_s", "peak_mem_gib")


class LogWindow:
    """Sums of the train step's metrics over the steps since the last log line, kept on the
    device: adding a step never waits for it. Every metric is averaged over the steps where it
    was finite ("loss", "loss_main", "loss_aux", "grad_norm": an fp16 step whose gradients
    overflowed still has a loss, not a gradient norm); "lr" and "loss_scale" keep their last
    value, "overflow" is counted. Steps whose loss was not finite (skipped by
    train.nonfinite='skip', or stopped at) are counted apart, with the first of them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: tuple[str, ...] = ()
        self.sums = torch.zeros(0, device=device)
        self.counts = torch.zeros(0, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: none
        self.overflows = torch.zeros((), dtype=torch.int64, device=device)
        self.last: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, step: Tensor, metrics: dict) -> None:
        """metrics: the train step's metrics; `step` is the step counter after the step (the
        step's number, counting from 1)."""
        keys = tuple(k for k in metrics if k not in _LAST + _COUNTED + _FLAGS)
        if keys != self.keys:
            if self.steps:
                raise ValueError(f"train metrics changed from {self.keys} to {keys}")
            self.keys = keys
            self.sums = torch.zeros(len(keys), device=self.device)
            self.counts = torch.zeros(len(keys), device=self.device)
        values = torch.stack([metrics[k].float() for k in keys])
        finite = torch.isfinite(values)
        self.sums += torch.where(finite, values, 0.0)
        self.counts += finite
        good = metrics["finite"]
        self.skipped += ~good
        self.first_bad = torch.where(~good & (self.first_bad == 0), step, self.first_bad)
        if "overflow" in metrics:
            self.overflows += metrics["overflow"]
        self.last = {k: metrics[k] for k in _LAST if k in metrics}
        self.steps += 1

    def first_bad_step(self) -> int:
        """The first step of the window whose loss was not finite; 0 when none (a host sync)."""
        return int(self.first_bad)

    def read(self) -> dict:
        """The means (NaN where a metric was never finite), the last values, the skipped steps
        and the overflows: one host sync."""
        n = len(self.keys)
        values = torch.cat([self.sums, self.counts,
                            torch.stack([self.skipped, self.overflows]).to(self.sums.dtype),
                            *(v.reshape(1).to(self.sums.dtype) for v in self.last.values())]
                           ).tolist()
        sums, counts, (skipped, overflows) = values[:n], values[n:2 * n], values[2 * n:2 * n + 2]
        means = {k: (s / c if c else math.nan) for k, s, c in zip(self.keys, sums, counts)}
        last = dict(zip(self.last, values[2 * n + 2:]))
        return {**means, **last, "skipped": int(skipped), "overflows": int(overflows)}

    def reset(self) -> None:
        for t in (self.sums, self.counts, self.skipped, self.first_bad, self.overflows):
            t.zero_()
        self.steps = 0

    def state_dict(self) -> dict:
        return {"keys": list(self.keys), "sums": self.sums, "counts": self.counts,
                "skipped": self.skipped, "first_bad": self.first_bad,
                "overflows": self.overflows, "last": self.last, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.keys = tuple(state["keys"])
        self.sums, self.skipped = state["sums"], state["skipped"]
        self.first_bad, self.steps = state["first_bad"], state["steps"]
        if "counts" in state:
            self.counts, self.overflows = state["counts"], state["overflows"]
            self.last = state["last"]
        else:   # a checkpoint written before the counts: every key counted the good steps
            self.counts = torch.full_like(self.sums, state["steps"]) - self.skipped
            self.overflows = torch.zeros_like(self.skipped)
            self.last = {"lr": state["lr"]}


class Lap(NamedTuple):
    """The train time between two laps of the clock."""
    seconds: float      # train seconds (pauses left out)
    steps: int          # steps taken (batches drawn through `Clock.next_batch`)
    data_wait: float    # seconds of it spent waiting for the next batch


class Clock:
    """Train time and wall time, carried over restarts. Time spent inside `paused()` (evals,
    checkpoints) is not train time, so that images/s measures training alone; each kind of
    pause is timed too, so the time left can count the evaluations still to come. Batches
    drawn through `next_batch` are counted, and the time spent waiting for them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._train = 0.0
        self._wall0 = self._lap0 = time.perf_counter()
        self._paused_in_lap = 0.0
        self._steps = 0
        self._waited = 0.0
        self._pauses: dict[str, list[float]] = {}   # kind: [total seconds, count]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued steps belong to the train time

    def next_batch(self, stream):
        """next(stream), timed: the host waiting for the input pipeline (the loader's workers,
        the copy to the device), not the device waiting for the host."""
        t0 = time.perf_counter()
        batch = next(stream)
        self.count_batch(time.perf_counter() - t0)
        return batch

    def count_batch(self, waited: float) -> None:
        """A batch drawn elsewhere (one stream feeding several clocks: seg/seeds_loop.py)."""
        self._waited += waited
        self._steps += 1

    def lap(self, sync: bool = False) -> Lap:
        """Train time since the last lap; sync=True waits for the device first (else the
        caller has just synchronised)."""
        if sync:
            self._sync()
        now = time.perf_counter()
        seconds = now - self._lap0 - self._paused_in_lap
        self._train += seconds
        lap = Lap(seconds, self._steps, self._waited)
        self._lap0, self._paused_in_lap, self._steps, self._waited = now, 0.0, 0, 0.0
        return lap

    @contextlib.contextmanager
    def paused(self, kind: str = "other"):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - t0
            self._paused_in_lap += seconds
            total = self._pauses.setdefault(kind, [0.0, 0])
            total[0] += seconds
            total[1] += 1

    def mean_pause(self, kind: str) -> float | None:
        """Mean seconds of the pauses of that kind so far (None before the first)."""
        total, count = self._pauses.get(kind, (0.0, 0))
        return total / count if count else None

    def train_time(self) -> float:
        return self._train + (time.perf_counter() - self._lap0 - self._paused_in_lap)

    def wall_time(self) -> float:
        return time.perf_counter() - self._wall0

    def state_dict(self) -> dict:
        return {"train_time": self.train_time(), "wall_time": self.wall_time(),
                "pauses": {k: list(v) for k, v in self._pauses.items()}}

    def load_state_dict(self, state: dict) -> None:
        now = time.perf_counter()
        self._train, self._lap0, self._paused_in_lap = state["train_time"], now, 0.0
        self._wall0 = now - state["wall_time"]
        self._pauses = {k: list(v) for k, v in state.get("pauses", {}).items()}


def remaining_seconds(step: int, steps: int, step_s: float, clock: Clock, *, eval_every: int,
                      checkpoint_every: int, test_fraction: float = 0.0
                      ) -> tuple[float, bool]:
    """(seconds left, whether every part of it was measured): the steps still to take at
    step_s each, plus the val evals and checkpoints still due at their mean times so far, plus
    the test eval (test_fraction: test images per val image, 0 without a test split). Before
    the first eval (or checkpoint) its time is unknown: left out, and the estimate marked."""
    evals = _due(step, steps, eval_every) + test_fraction
    saves = _due(step, steps, checkpoint_every)
    seconds, measured = (steps - step) * step_s, True
    for count, kind in ((evals, "eval"), (saves, "checkpoint")):
        mean = clock.mean_pause(kind)
        if count and mean is None:
            measured = False
        elif count:
            seconds += count * mean
    return seconds, measured


def _due(step: int, steps: int, every: int) -> int:
    """How many of the steps (step, steps] are multiples of `every`, or the last step."""
    if step >= steps:
        return 0
    return steps // every - step // every + (1 if steps % every else 0)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most device memory allocated since the last call (CUDA; None elsewhere): read from
    the allocator's counters, no sync."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


class EvalHistory:
    """The last eval record of each split, and the best val record by `key` (train.best_metric):
    the highest, or the lowest for a loss (a key containing "loss", as mmengine's save_best
    decides); a missing or NaN value never wins, and a tie keeps the earlier record."""

    def __init__(self, key: str = "miou"):
        self.key, self.lower_is_better = key, "loss" in key
        self.last: dict[str, dict] = {}
        self.best: dict | None = None

    def add(self, record: dict) -> bool:
        """Keeps `record`; True when it is the new best."""
        self.last[record["split"]] = record
        better = record["split"] == "val" and (
            self.best is None or self._score(record) > self._score(self.best))
        if better:
            self.best = record
        return better

    def _score(self, record: dict) -> float:
        value = record.get(self.key)
        if value is None or value != value:
            return -math.inf
        return -value if self.lower_is_better else value

    def state_dict(self) -> dict:
        return {"last": self.last, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.best = state["last"], state["best"]


class DropoutRng:
    """The global generators (CPU, and CUDA on a GPU) that dropout draws from. Rank r starts
    from seed + r * RANK_SEED_STRIDE, so ranks draw different masks; the state of every rank is
    saved, so a resumed run draws the masks the uninterrupted one would have."""

    def __init__(self, seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 group=None):
        self.device, self.rank, self.world_size, self.group = device, rank, world_size, group
        torch.manual_seed(seed + RANK_SEED_STRIDE * rank)

    def state_dict(self) -> list[dict]:
        """Every rank's state; a collective, so every rank calls it."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1:
            return [state]
        return distributed.gather_objects(state, self.group)

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != self.world_size:
            warnings.warn(f"the checkpoint was written by {len(states)} rank(s), this run has "
                          f"{self.world_size}: dropout draws restart from the seed, so the run "
                          "will not match an uninterrupted one")
            return
        state = states[self.rank]
        torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)
