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
        `shown` is printed only (steps: the run's length, eta_s: the estimated time left)."""
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


def progress_line(record: dict, steps: int | None = None, eta_s: float | None = None) -> str:
    """The line printed for a record: the train losses, lr, throughput and ETA; an eval's
    mIoU, pixel accuracy and loss."""
    step, split = record["step"], record["split"]
    if split == "train":
        parts = [f"step {step}/{steps or '?'}", f"loss {_num(record['loss'])}"]
        if "loss_aux" in record:
            parts.append(f"(main {_num(record['loss_main'])} aux {_num(record['loss_aux'])})")
        parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:.1f} img/s"]
        if eta_s is not None:
            parts.append(f"eta {eta_s:.0f}s")
        if record.get("skipped"):
            parts.append(f"skipped {record['skipped']}")
        return "  ".join(parts)
    return (f"step {step}  {split} miou {_num(record['miou'])}  pixel_acc "
            f"{_num(record['pixel_acc'])}  loss {_num(record['loss'])}")


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"
