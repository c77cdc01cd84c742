"""Optional TensorBoard logging: what is mirrored, and a clear error when the package is absent."""
from __future__ import annotations

import math

import pytest

from seg import errors, rundir, writers


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_scalars_of_a_record():
    record = {"step": 5, "split": "val", "miou": 0.5, "loss": 1, "fwiou": math.nan,
              "mean_acc": None, "iou_per_class": [0.9, math.nan, 0.1], "acc_per_class": [1, 2],
              "confusion_matrix": [[1, 0], [0, 1]], "flag": True}
    assert writers.tensorboard_scalars(record, ("bg", "cat", "dog")) == [
        ("val/miou", 0.5), ("val/loss", 1.0), ("val/iou_per_class/bg", 0.9),
        ("val/iou_per_class/dog", 0.1)]  # NaN, None, bools and mismatched lists left out


def test_writer_mirrors_every_record_with_class_names(tmp_path, capsys):
    run = rundir.RunDir(tmp_path)
    writer = writers.Writer(run, class_names=("bg", "fg"))
    writer.tensorboard = FakeWriter()
    writer.record({"step": 3, "split": "train", "loss": 0.25, "loss_main": 0.25, "lr": 0.1,
                   "images_per_s": 2.0}, steps=10, eta_s=7)
    writer.record({"step": 4, "split": "test", "iou_per_class": [0.5, 0.75], "miou": 0.625,
                   "pixel_acc": 0.9, "loss": 0.3})
    assert writer.tensorboard.calls == [
        ("train/loss", 0.25, 3), ("train/loss_main", 0.25, 3), ("train/lr", 0.1, 3),
        ("train/images_per_s", 2.0, 3), ("test/iou_per_class/bg", 0.5, 4),
        ("test/iou_per_class/fg", 0.75, 4), ("test/miou", 0.625, 4),
        ("test/pixel_acc", 0.9, 4), ("test/loss", 0.3, 4)]
    assert len(run.log.read()) == 2
    assert capsys.readouterr().out.splitlines() == [
        "step 3/10  loss 0.2500  lr 0.1  2.0 img/s  eta 0:00:07",
        "step 4  test miou 0.6250  pixel_acc 0.9000  loss 0.3000"]


def test_a_rank_that_does_not_write_writes_nothing(tmp_path, capsys):
    writer = writers.Writer(rundir.RunDir(tmp_path / "w"), class_names=(), enabled=False)
    writer.record({"step": 1, "split": "train", "loss": 1.0, "lr": 0.1, "images_per_s": 1.0})
    writer.summary({"steps": 1})
    assert not (tmp_path / "w").exists() and capsys.readouterr().out == ""


@pytest.mark.skipif(writers.has_tensorboard(), reason="tensorboard is installed")
def test_asking_without_the_package_is_a_one_line_config_error(tmp_path):
    writers.Writer(rundir.RunDir(tmp_path), (), tensorboard=False)  # off by default: not needed
    with pytest.raises(errors.ConfigError, match=r"train.tensorboard.*pip install tensorboard"):
        writers.Writer(rundir.RunDir(tmp_path), (), tensorboard=True)
