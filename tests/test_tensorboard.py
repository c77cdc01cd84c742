"""Optional TensorBoard logging: what is mirrored, and a clear error when the package is absent."""
from __future__ import annotations

import math

import pytest

from configs import unet
from seg import writers


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


def test_metrics_log_mirrors_every_record(tmp_path):
    log = writers.MetricsLog(tmp_path / "metrics.jsonl", class_names=("bg", "fg"))
    log.tensorboard = FakeWriter()
    log.write({"step": 3, "split": "train", "loss": 0.25, "lr": 0.1})
    log.write({"step": 4, "split": "test", "iou_per_class": [0.5, 0.75]})
    assert log.tensorboard.calls == [("train/loss", 0.25, 3), ("train/lr", 0.1, 3),
                                     ("test/iou_per_class/bg", 0.5, 4),
                                     ("test/iou_per_class/fg", 0.75, 4)]
    assert len(log.read()) == 2


@pytest.mark.skipif(writers.has_tensorboard(), reason="tensorboard is installed")
def test_asking_without_the_package_is_a_one_line_config_error():
    from experiments import train
    cfg = unet.get_config()
    train.validate(cfg)  # off by default: never required
    cfg.train.tensorboard = True
    with pytest.raises(train.ConfigError, match=r"train.tensorboard.*pip install tensorboard"):
        train.validate(cfg)
