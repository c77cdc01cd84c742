"""The one output path of a run: progress lines on stdout, records in metrics.jsonl, pictures,
the summary, and the optional TensorBoard mirror. In a data-parallel job only rank 0 writes;
the other ranks get a Writer that drops everything.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Sequence

import torch
import torchvision

from seg.errors import ConfigError
from seg.rundir import RunDir


def has_tensorboard() -> bool:
    """Whether the optional tensorboard package (torch.utils.tensorboard's backend) is there."""
    return importlib.util.find_spec("tensorboard") is not None


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


class Writer:
    """Writes a run's output to `rundir` (when `enabled`) and prints its progress lines.

    tensorboard: also mirror every record and picture to <workdir>/tensorboard (needs the
    tensorboard package); a run resumed at step k starts it with purge_step=k+1, so that
    TensorBoard hides what the interrupted run wrote after its checkpoint.
    """

    def __init__(self, rundir: RunDir, class_names: Sequence[str], *, enabled: bool = True,
                 tensorboard: bool = False):
        if tensorboard and not has_tensorboard():
            raise ConfigError("train.tensorboard=True needs the tensorboard package, which is "
                              "not installed (pip install tensorboard)")
        self.rundir, self.class_names, self.enabled = rundir, tuple(class_names), enabled
        self._wants_tensorboard, self.tensorboard = tensorboard, None

    def start(self, step: int) -> None:
        """Called when the loop starts at `step` (0, or the step a run resumes from)."""
        if self.enabled and self._wants_tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: only when asked for
            self.tensorboard = SummaryWriter(str(self.rundir.tensorboard), purge_step=step + 1)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def record(self, record: dict, **shown) -> None:
        """Appends to metrics.jsonl (and TensorBoard) and prints the record's progress line;
        `shown` is printed only (steps: the run's length, eta_s: the estimated time left,
        eta_measured: whether every part of that estimate was measured)."""
        if not self.enabled:
            return
        self.rundir.log.append(record)
        if self.tensorboard is not None:
            for tag, value in tensorboard_scalars(record, self.class_names):
                self.tensorboard.add_scalar(tag, value, record["step"])
        self.print(progress_line(record, **shown))

    def picture(self, step: int, picture: torch.Tensor) -> None:
        """picture: uint8 (3, H, W), written as predictions/step_<step>.png."""
        if not self.enabled:
            return
        torchvision.io.write_png(picture.cpu(), str(self.rundir.picture_file(step)))
        if self.tensorboard is not None:
            self.tensorboard.add_image("val/predictions", picture.cpu(), step)

    def summary(self, summary: dict) -> None:
        if self.enabled:
            self.rundir.write_summary(summary)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def progress_line(record: dict, steps: int | None = None, eta_s: float | None = None,
                  eta_measured: bool = True) -> str:
    """The line printed for a record. Train: the losses (main and auxiliary head apart), lr,
    gradient norm, throughput, the time of a step and how much of it went to waiting for data,
    peak device memory, fp16's loss scale and overflows, skipped steps and the time left
    (">" while the evaluations still to come have not been timed). Eval: mIoU, pixel accuracy
    and loss."""
    step, split = record["step"], record["split"]
    if split != "train":
        return (f"step {step}  {split} miou {_num(record['miou'])}  pixel_acc "
                f"{_num(record['pixel_acc'])}  loss {_num(record['loss'])}")
    parts = [f"step {step}/{steps or '?'}", f"loss {_num(record['loss'])}"]
    if "loss_aux" in record:
        parts.append(f"(main {_num(record['loss_main'])} aux {_num(record['loss_aux'])})")
    parts.append(f"lr {record['lr']:.3g}")
    if "grad_norm" in record:
        parts.append(f"grad {_num(record['grad_norm'], 3)}")
    parts.append(f"{record['images_per_s']:.1f} img/s")
    if "step_s" in record:
        parts.append(f"step {record['step_s']:.3f}s (data {record['data_s']:.3f}s)")
    if record.get("peak_mem_gib") is not None:
        parts.append(f"mem {record['peak_mem_gib']:.1f}G")
    if "loss_scale" in record:
        parts.append(f"scale {record['loss_scale']:g}" + (
            f" ({record['overflows']} overflowed)" if record.get("overflows") else ""))
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']}")
    if eta_s is not None:
        parts.append(f"eta {'' if eta_measured else '>'}{hms(eta_s)}")
    return "  ".join(parts)


def startup_line(info: dict) -> str:
    """What a run is about to do, printed before its first step (which may take a minute to
    compile): device, model size, data, steps and the fast-path settings."""
    images = " / ".join(f"{n} {k}" for k, n in info["images"].items())
    ranks = f" x {info['ranks']} ranks" if info["ranks"] > 1 else ""
    start = f" from step {info['start']}" if info["start"] else ""
    return (f"{info['device']}{ranks}  {info['model']} {info['params'] / 1e6:.2f}M params "
            f"({info['trainable_params'] / 1e6:.2f}M trained)  images {images}  batch "
            f"{info['batch_size']}, {info['steps_per_epoch']} steps/epoch  {info['steps']} "
            f"steps{start}  precision {info['precision']}"
            f"{'  compile' if info['compile'] else ''}"
            f"{'  channels_last' if info['channels_last'] else ''}")


def first_step_line(step: int, lap, compiled: bool = False) -> str:
    """The first step's time (a tracking.Lap): compilation and cuDNN autotuning happen there."""
    return (f"step {step} took {lap.seconds:.1f}s (the first{', compiled' if compiled else ''}; "
            f"data {lap.data_wait:.1f}s)")


def hms(seconds: float) -> str:
    """h:mm:ss."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _num(v, digits: int = 4) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"
