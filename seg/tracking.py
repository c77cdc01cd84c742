"""What the training loop keeps besides the TrainState, each piece saving and restoring itself
(`state_dict()` / `load_state_dict()`), so that a checkpoint is one entry per piece and a resumed
run continues each of them exactly:

  LogWindow    the train metrics between two log lines, summed on the device
  Clock        train time (evaluation and checkpointing paused out) and wall time
  EvalHistory  the last eval of each split and the best val eval (train.best_metric)
  DropoutRng   the global generators that dropout draws from, on every rank
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
from torch import Tensor

from seg import distributed

# rank r draws dropout masks from seed + r * this: rank 0 is the single-process run
RANK_SEED_STRIDE = 1_000_003


class LogWindow:
    """Sums of the train step's loss metrics over the steps since the last log line, kept on the
    device: adding a step never waits for it. Steps whose loss was not finite (skipped by
    train.nonfinite='skip') are counted apart and left out of the means."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: tuple[str, ...] = ()
        self.sums = torch.zeros(0, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: none
        self.lr = torch.zeros((), device=device)
        self.steps = 0

    def add(self, step: Tensor, metrics: dict) -> None:
        """metrics: the train step's "loss*" scalars, "lr" and the "finite" flag; `step` is the
        step counter after the step (the step's number, counting from 1)."""
        keys = tuple(k for k in metrics if k.startswith("loss"))
        if keys != self.keys:
            if self.steps:
                raise ValueError(f"train metrics changed from {self.keys} to {keys}")
            self.keys, self.sums = keys, torch.zeros(len(keys), device=self.device)
        finite = metrics["finite"]
        values = torch.stack([metrics[k].float() for k in keys])
        self.sums += torch.where(finite, values, 0.0)
        self.skipped += ~finite
        self.first_bad = torch.where(~finite & (self.first_bad == 0), step, self.first_bad)
        self.lr = metrics["lr"]
        self.steps += 1

    def first_bad_step(self) -> int:
        """The first step of the window whose loss was not finite; 0 when none (a host sync)."""
        return int(self.first_bad)

    def read(self) -> dict:
        """The means of the finite steps (NaN when none), lr and skipped steps: one host sync."""
        *sums, skipped, lr = torch.cat([self.sums, self.skipped.view(1).to(self.sums.dtype),
                                        self.lr.view(1).to(self.sums.dtype)]).tolist()
        good = self.steps - int(skipped)
        means = {k: (s / good if good else math.nan) for k, s in zip(self.keys, sums)}
        return {**means, "lr": lr, "skipped": int(skipped)}

    def reset(self) -> None:
        self.sums.zero_()
        self.skipped.zero_()
        self.first_bad.zero_()
        self.steps = 0

    def state_dict(self) -> dict:
        return {"keys": list(self.keys), "sums": self.sums, "skipped": self.skipped,
                "first_bad": self.first_bad, "lr": self.lr, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.keys = tuple(state["keys"])
        self.sums, self.skipped = state["sums"], state["skipped"]
        self.first_bad, self.lr, self.steps = state["first_bad"], state["lr"], state["steps"]


class Clock:
    """Train time and wall time, carried over restarts. Time spent inside `paused()` (evals,
    checkpoints) is not train time, so that images/s measures training alone."""

    def __init__(self, device: torch.device):
        self.device = device
        self._train = 0.0
        self._wall0 = self._lap0 = time.perf_counter()
        self._paused_in_lap = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued steps belong to the train time

    def lap(self) -> float:
        """Train seconds since the last lap (the caller has just synchronised)."""
        now = time.perf_counter()
        seconds = now - self._lap0 - self._paused_in_lap
        self._train += seconds
        self._lap0, self._paused_in_lap = now, 0.0
        return seconds

    @contextlib.contextmanager
    def paused(self):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused_in_lap += time.perf_counter() - t0

    def train_time(self) -> float:
        return self._train + (time.perf_counter() - self._lap0 - self._paused_in_lap)

    def wall_time(self) -> float:
        return time.perf_counter() - self._wall0

    def state_dict(self) -> dict:
        return {"train_time": self.train_time(), "wall_time": self.wall_time()}

    def load_state_dict(self, state: dict) -> None:
        now = time.perf_counter()
        self._train, self._lap0, self._paused_in_lap = state["train_time"], now, 0.0
        self._wall0 = now - state["wall_time"]


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
