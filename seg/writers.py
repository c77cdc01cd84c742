"""The run directory's JSON files (DESIGN.md, "The run directory").

Values are plain JSON: tensors become numbers or lists, NaN and infinities become null.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch


def to_jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fsync_directory(path: str | os.PathLike) -> None:
    """Makes a rename or a new file in directory `path` survive a power cut, not only a crash
    of the process (POSIX; a no-op where directories cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to a temporary file, syncs it and renames it over `path`: readers and a
    restarted run see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic: readers see the old file or the new one, never a partial one."""
    replace_atomically(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def has_tensorboard() -> bool:
    """Whether the optional tensorboard package (torch.utils.tensorboard's backend) is there."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_writer(logdir: str | os.PathLike, purge_step: int | None = None):
    """A torch.utils.tensorboard.SummaryWriter (needs the tensorboard package). A run resumed at
    step k passes purge_step=k+1, so that TensorBoard hides the events the crashed run wrote
    after its checkpoint, as MetricsLog.truncate_after does for the log."""
    from torch.utils.tensorboard import SummaryWriter  # optional: imported only when asked for
    return SummaryWriter(str(logdir), purge_step=purge_step)


def tensorboard_scalars(record: dict, class_names: Sequence[str] = ()) -> list[tuple[str, float]]:
    """A metrics record as TensorBoard scalars "<split>/<key>"; per-class lists as
    "<split>/<key>/<class name>". Missing values (None, NaN) are left out."""
    split, scalars = record["split"], []
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            scalars.append((f"{split}/{key}", value))
        elif key.endswith("_per_class") and len(value) == len(class_names):
            scalars += [(f"{split}/{key}/{name}", v) for name, v in zip(class_names, value)]
    return [(tag, float(v)) for tag, v in scalars if v is not None and math.isfinite(v)]


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, each line flushed and synced whole;
    optionally mirrors the numbers to a TensorBoard writer (`tensorboard`)."""

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str] = ()):
        self.path = Path(path)
        self.class_names = tuple(class_names)
        self.tensorboard = None

    def write(self, record: dict) -> None:
        if "step" not in record or record.get("split") not in ("train", "val", "test"):
            raise ValueError(f"a metrics record needs 'step' and a split in train/val/test: "
                             f"{sorted(record)}")
        line = json.dumps(to_jsonable(record), allow_nan=False)
        created = not self.path.exists()
        # One write call of a whole line: a crash leaves at most a torn last line, which
        # truncate_after drops on resume.
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_directory(self.path.parent)
        if self.tensorboard is not None:
            for tag, value in tensorboard_scalars(record, self.class_names):
                self.tensorboard.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def truncate_after(self, step: int, redo_splits: tuple[str, ...] = ()) -> None:
        """On resume: keep the records up to `step`; drop later ones, any torn last line, and
        the records of `redo_splits` (those the resumed run writes again whatever the step,
        e.g. the final test evaluation)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", math.inf) <= step and record.get("split") not in redo_splits:
                kept.append(line)
        replace_atomically(self.path, "".join(line + "\n" for line in kept))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]
