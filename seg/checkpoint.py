"""Atomic save / restore of the train state.

A checkpoint is written to a temporary file, flushed to disk and renamed (and the directory
synced, so the rename itself survives a power cut), so a crash leaves either the old file or
the new one, never half of one. The last `keep` are kept; restore walks back from the newest and
skips (and reports, naming the file) any that cannot be read.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from seg import writers

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def _list(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save(directory: str | os.PathLike, step: int, payload: dict, keep: int = 3) -> Path:
    """Writes `payload` (tensors, dicts, lists, numbers, strings) as ckpt_<step>.pt."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt_{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    writers.fsync_directory(directory)  # the new name is durable before the old files go
    for _, old in _list(directory)[:-keep]:
        old.unlink()
    return path


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint file, readable or not (for messages)."""
    found = _list(Path(directory))
    return found[-1][1] if found else None


def restore(directory: str | os.PathLike, map_location="cpu") -> dict | None:
    """Loads the newest readable checkpoint, or returns None when there is none."""
    for step, path in reversed(_list(Path(directory))):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # a truncated or corrupt file: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                          "trying the previous one")
    return None
