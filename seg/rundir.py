"""The run directory: the one module that writes and reads it.

  <workdir>/config.json          the resolved config
  <workdir>/inference.json       what using the model needs: classes, palette, normalisation, ...
  <workdir>/metrics.jsonl        one JSON record per line, each with "step" and "split"
  <workdir>/summary.json         model, steps, times, throughput, last and best evals, environment
  <workdir>/checkpoints/         ckpt_<step:08d>.pt: the train state and the loop's helpers;
                                 best_<step:08d>.pt: params and buffers of the best val eval
  <workdir>/eval_<split>[_<tag>].json   evaluations of a finished run (experiments/evaluate.py)
  <workdir>/per_image/<name>.npz per-image counts of an evaluation (the loop's latest eval of
                                 each split: <split>.npz; evaluate.py's: eval_<split>[_<tag>].npz)
  <workdir>/predictions/         step_<step:08d>.png pictures of val predictions
  <workdir>/tensorboard/         the optional TensorBoard mirror of metrics.jsonl

Values are plain JSON: tensors become numbers or lists, NaN and infinities become null. Every
file except metrics.jsonl is replaced atomically (written to a temporary file, synced, renamed,
the folder synced), so a reader or a restarted run sees the old file or the new one, never a
part of one; metrics lines are appended whole and synced, so a crash leaves at most a torn last
line, which readers skip.

In a notebook:

  run = seg.rundir.load("runs/psp")
  run.config.optimizer.lr, run.summary["best_eval"]["miou"]
  [r["miou"] for r in run.records if r["split"] == "val"]
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import ml_collections
import numpy as np
import torch

from seg import config as config_lib
from seg.errors import ConfigError

SPLITS = ("train", "val", "test")
_CHECKPOINT = re.compile(r"^ckpt_(\d+)\.pt$")
_BEST = re.compile(r"^best_(\d+)\.pt$")

# Config fields that play no part in a run's numbers: a run may resume with them changed. Each
# is how often something is reported or saved, or how the same batches are produced.
RESUMABLE_FIELDS = ("data.workers", "data.prefetch", "data.verify", "train.log_every",
                    "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.num_pictures", "train.tensorboard")


def to_jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, ml_collections.ConfigDict):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fsync_directory(path: str | os.PathLike) -> None:
    """Makes a rename or a new file in folder `path` survive a power cut, not only a crash of
    the process (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike, write: Callable, binary: bool = False) -> None:
    """Calls write(file) on a temporary file next to `path`, syncs it and renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, a bad value) leaves nothing behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    replace_atomically(path, lambda f: f.write(text))


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


class MetricsLog:
    """metrics.jsonl: records appended one whole, synced line at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        if "step" not in record or record.get("split") not in SPLITS:
            raise ValueError(f"a metrics record needs 'step' and a split in {SPLITS}: "
                             f"{sorted(record)}")
        line = json.dumps(to_jsonable(record), allow_nan=False)
        created = not self.path.exists()
        with open(self.path, "a") as f:  # one write of a whole line
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_directory(self.path.parent)

    def read(self) -> list[dict]:
        """Every record; a torn line (a run killed mid-write) is skipped."""
        if not self.path.exists():
            return []
        return [r for r in map(_parse, self.path.read_text().splitlines()) if r is not None]

    def truncate_after(self, step: int, redo_splits: tuple[str, ...] = ()) -> None:
        """On resume: keeps the records up to `step`, drops later ones, torn lines and those of
        `redo_splits` (which the resumed run writes again whatever the step: the final test)."""
        if not self.path.exists():
            return
        kept = [json.dumps(r, allow_nan=False) for r in self.read()
                if r.get("step", math.inf) <= step and r.get("split") not in redo_splits]
        replace_atomically(self.path, lambda f: f.write("".join(line + "\n" for line in kept)))


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class RunDir:
    """The files of one run directory. Creating the object touches nothing on disk."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir)
        self.config_file = self.path / "config.json"
        self.inference_file = self.path / "inference.json"
        self.summary_file = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.predictions = self.path / "predictions"
        self.tensorboard = self.path / "tensorboard"
        self.log = MetricsLog(self.path / "metrics.jsonl")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ config

    def check_usable(self, cfg=None) -> list[str]:
        """Raises ConfigError when the path cannot be a run directory (it, or a folder above
        it, is a file) or when it holds a run whose config differs from `cfg` in a field that
        changes the run's numbers (resuming would mix two runs); the message lists each such
        field with its old and new value. Returns the differences a run may resume with, each
        as "field old -> new (why)": a field of RESUMABLE_FIELDS, or one that only one of the
        two configs has (added to or removed from the code since the run was made, so the run
        computed what the code did without it)."""
        for p in (self.path, *self.path.parents):
            if p.exists() and not p.is_dir():
                raise ConfigError(f"workdir {self.path}: {p} is a file, not a folder")
        if cfg is None or not self.config_file.exists():
            return []
        saved, new = config_lib.flatten(read_json(self.config_file)), \
            config_lib.flatten(to_jsonable(cfg))
        allowed, refused = [], []
        for k in config_lib.diff(saved, new):
            change = f"{k} {_shown(saved, k)} -> {_shown(new, k)}"
            if k in RESUMABLE_FIELDS:
                allowed.append(f"{change} (plays no part in the numbers)")
            elif k not in saved or k not in new:
                allowed.append(f"{change} (a field the run's code did not have)")
            else:
                refused.append(change)
        if refused:
            raise ConfigError(
                f"{self.path} holds a run with another config ({'; '.join(refused)}): "
                f"{'this changes' if len(refused) == 1 else 'these change'} what the run "
                f"computes, so it cannot resume with {'it' if len(refused) == 1 else 'them'}; "
                f"use a new workdir (only {', '.join(RESUMABLE_FIELDS)} may change on resume)")
        return allowed

    def write_config(self, cfg) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, cfg)

    def config(self, defaults: ml_collections.ConfigDict | None = None
               ) -> ml_collections.ConfigDict:
        """The run's config (fields added to `defaults` since the run was made filled in)."""
        if not self.config_file.exists():
            raise ConfigError(f"{self.config_file} does not exist: is {self.path} a run "
                              "directory?")
        return config_lib.from_dict(read_json(self.config_file), defaults)

    # ------------------------------------------------------------------ inference

    def write_inference(self, meta: dict) -> None:
        """inference.json: what using the trained model needs besides its weights (class names,
        palette, normalisation, ignore index, number of outputs, the eval forward's settings;
        seg.experiment.inference_meta), written when the run starts."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.inference_file, meta)

    def inference(self) -> dict:
        if not self.inference_file.exists():
            hint = (" (a run made before inference.json existed: run train.py on it again with "
                    "the same config, which writes it and changes nothing else)"
                    if self.config_file.exists() else f": is {self.path} a run directory?")
            raise ConfigError(f"{self.inference_file} does not exist{hint}")
        return read_json(self.inference_file)

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict | None:
        return read_json(self.summary_file) if self.summary_file.exists() else None

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary_file, summary)

    def finished(self, cfg) -> dict | None:
        """The summary of a run that has done all cfg.train.steps and its final eval (test
        when the dataset has a test split, else val), or None."""
        summary, steps = self.summary() or {}, cfg.train.steps
        final = (summary.get("last_eval") or {}).get("test" if cfg.data.test_split else "val")
        done = summary.get("steps") == steps and (final or {}).get("step") == steps
        return summary if done else None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_files(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir()
                 if (m := _CHECKPOINT.match(p.name))]
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint file, readable or not (for messages)."""
        found = self.checkpoint_files()
        return found[-1][1] if found else None

    def save_checkpoint(self, step: int, payload: dict, keep: int) -> Path:
        """Writes ckpt_<step>.pt atomically, then deletes all but the newest `keep`."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"ckpt_{step:08d}.pt"
        replace_atomically(path, lambda f: torch.save(payload, f), binary=True)
        for _, old in self.checkpoint_files()[:-keep]:
            old.unlink()
        return path

    def restore_checkpoint(self, map_location="cpu") -> dict | None:
        """The newest readable checkpoint, or None when there is none; an unreadable one (a
        truncated file) is reported, naming it, and the one before it is tried."""
        found = self.newest_readable(map_location)
        return found[0] if found else None

    def newest_readable(self, map_location="cpu") -> tuple[dict, Path] | None:
        """(payload, file) of the newest readable checkpoint (see restore_checkpoint)."""
        for _, path in reversed(self.checkpoint_files()):
            try:
                return load_checkpoint(path, map_location), path
            except Exception as e:  # a truncated or corrupt file: fall back to the previous one
                warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: "
                              f"{_first_line(e)}); trying the previous one")
        return None

    def best_files(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.checkpoints.iterdir()
                      if (m := _BEST.match(p.name)))

    def best_checkpoint(self) -> Path | None:
        """The weights of the best val eval so far: the newest best file (a best file is only
        written when its eval beats the one before, and those of an interrupted run's future
        are deleted on resume)."""
        found = self.best_files()
        return found[-1][1] if found else None

    def save_best(self, step: int, payload: dict, keep_step: int | None) -> Path:
        """Writes best_<step>.pt atomically and deletes the other best files but the one of
        `keep_step` (the best of the newest checkpoint, which a resumed run starts from)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"best_{step:08d}.pt"
        replace_atomically(path, lambda f: torch.save(payload, f), binary=True)
        self.prune_best(keep=(step, keep_step))
        return path

    def prune_best(self, keep: tuple[int | None, ...]) -> None:
        """Deletes the best files whose step is not in `keep`."""
        for step, path in self.best_files():
            if step not in keep:
                path.unlink()

    # ------------------------------------------------------------------ evals and pictures

    def eval_file(self, split: str, tag: str = "") -> Path:
        return self.path / f"eval_{split}{'_' + tag if tag else ''}.json"

    def write_eval(self, record: dict, tag: str = "") -> Path:
        path = self.eval_file(record["split"], tag)
        write_json(path, record)
        return path

    def per_image_file(self, name: str) -> Path:
        return self.path / "per_image" / f"{name}.npz"

    def write_per_image(self, name: str, per_image: dict, *, step: int, split: str,
                        sources: list[str], class_names) -> Path:
        """Each evaluated image's (K, 3) counts [tp, ground truth, predicted] per class
        (seg.metrics.per_image_counts) with its dataset index and source file(s): any
        split-level IoU or accuracy can be recomputed for any subset of the images."""
        path = self.per_image_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"index": per_image["index"].numpy(), "counts": per_image["counts"].numpy(),
                  "source": np.array(sources, dtype=str), "step": np.array(step),
                  "split": np.array(split), "class_names": np.array(list(class_names), dtype=str)}
        replace_atomically(path, lambda f: np.savez_compressed(f, **arrays), binary=True)
        return path

    def picture_file(self, step: int) -> Path:
        self.predictions.mkdir(parents=True, exist_ok=True)
        return self.predictions / f"step_{step:08d}.png"


def newest_common_checkpoint(runs: list[RunDir], map_location="cpu"
                             ) -> tuple[int, list[dict]] | None:
    """(step, payloads) of the newest step at which every run has a readable checkpoint (the
    members of a train.num_seeds run resume together), or None. Unreadable files are reported,
    naming them, and an older common step is tried."""
    steps = set.intersection(*({s for s, _ in r.checkpoint_files()} for r in runs))
    for step in sorted(steps, reverse=True):
        payloads = []
        for r in runs:
            path = r.checkpoints / f"ckpt_{step:08d}.pt"
            try:
                payloads.append(load_checkpoint(path, map_location))
            except Exception as e:  # a truncated or corrupt file: try an older step
                warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: "
                              f"{_first_line(e)}); trying the previous common one")
                break
        else:
            return step, payloads
    return None


class PerImage(NamedTuple):
    """An evaluation's per-image results (RunDir.write_per_image)."""
    index: np.ndarray        # (N,) dataset indices
    counts: np.ndarray       # (N, K, 3) [true positives, ground truth, predicted] per class
    source: np.ndarray       # (N,) the files behind each image ("" when generated)
    step: int
    split: str
    class_names: tuple[str, ...]


def load_per_image(path: str | os.PathLike) -> PerImage:
    try:
        with np.load(path) as f:
            return PerImage(f["index"], f["counts"], f["source"], int(f["step"]),
                            str(f["split"]), tuple(str(n) for n in f["class_names"]))
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{path}: not a per-image results file ({_first_line(e)})") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint file's payload (tensors, dicts, lists, numbers, strings only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _shown(flat: dict, key: str) -> str:
    return json.dumps(flat[key]) if key in flat else "(absent)"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


class Run(NamedTuple):
    """A run directory read back: what notebooks and report tools work from."""
    path: Path
    config: ml_collections.ConfigDict
    records: list[dict]
    summary: dict | None


def load(workdir: str | os.PathLike, defaults: ml_collections.ConfigDict | None = None) -> Run:
    """The config, the metrics records and the summary of a run, in one call."""
    run = RunDir(workdir)
    return Run(run.path, run.config(defaults), run.log.read(), run.summary())
