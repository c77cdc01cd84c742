"""Every encoder-decoder config (DeepLabV3+, UPerNet, Semantic FPN, LR-ASPP, UNet's decoder on an
encoder) trains on the embedded dataset through the loop and lowers the loss; the main command
takes them with any encoder; a run with stochastic depth resumes bitwise."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg import errors, loop, tracking

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["deeplabv3plus", "upernet", "fpn", "lraspp", "backbone_unet"]
TINY = {"data.image_size": 32, "data.num_train": 32, "data.num_val": 8, "data.num_test": 8,
        "train.steps": 12, "train.batch_size": 8, "train.log_every": 4, "train.eval_every": 12,
        "train.checkpoint_every": 12, "train.eval_batch_size": 8, "train.num_pictures": 0}
pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


def config(name, **overrides):
    c = importlib.import_module(f"configs.{name}").get_config()
    for key, value in {**TINY, **overrides}.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def train_records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_and_lowers_the_loss(name, tmp_path):
    summary = loop.train_and_evaluate(config(name), tmp_path / "w")
    losses = [r["loss"] for r in train_records(tmp_path / "w")]
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # means over steps 1-4, 9-12
    assert summary["model"]["name"] == name
    assert 0.0 <= summary["last_eval"]["test"]["miou"] <= 1.0


def test_main_command_takes_a_new_config_with_any_encoder(tmp_path):
    flags = [f"--config.{k}={v}" for k, v in {**TINY, "train.steps": 2, "train.log_every": 1,
                                               "train.eval_every": 2, "data.num_train": 8,
                                               "train.batch_size": 4,
                                               "train.checkpoint_every": 2}.items()]
    proc = subprocess.run(
        [sys.executable, "experiments/train.py", "--config=configs/upernet.py",
         f"--workdir={tmp_path / 'w'}", "--config.model.backbone=mobilenet_v3_large",
         "--config.model.channels=32", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(train_records(tmp_path / "w")) == 2


def test_an_encoder_that_cannot_dilate_is_a_config_error_before_anything_is_written(tmp_path):
    cfg = config("upernet", **{"model.backbone": "swin_t", "model.output_stride": 8})
    with pytest.raises(errors.ConfigError, match="output_stride=8: swin_t") as e:
        loop.train_and_evaluate(cfg, tmp_path / "w")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


@pytest.mark.usefixtures("tiny_encoders")
def test_a_run_with_stochastic_depth_resumes_bitwise(tmp_path):
    # Semantic FPN on a test-sized Swin (no layer scale: a dropped block changes the output),
    # its head's dropout off so that the blocks' draws are the only randomness. The loop
    # checkpoints the global RNG (seg.tracking.DropoutRng), so a run resumed from step 4 draws
    # what the uninterrupted run drew.
    cfg = config("fpn", **{"model.backbone": "swin_t", "model.drop_path": 0.5,
                           "model.dropout": 0.0, "train.steps": 8,
                           "train.checkpoint_every": 4, "train.eval_every": 8})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    loop.train_and_evaluate(cfg, whole)
    shutil.copytree(whole, resumed)
    (resumed / "checkpoints" / "ckpt_00000008.pt").unlink()
    loop.train_and_evaluate(cfg, resumed)
    a, b = (torch.load(w / "checkpoints" / "ckpt_00000008.pt", weights_only=True)["state"]
            for w in (whole, resumed))
    for part in ("params", "buffers"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), (part, k)
    timeless = lambda records: [{k: v for k, v in r.items() if k not in tracking.TIMING_KEYS}  # noqa: E731
                                for r in records]
    assert timeless(train_records(resumed)) == timeless(train_records(whole))
