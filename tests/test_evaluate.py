"""experiments/evaluate.py on a tiny trained run: the restored model reproduces the run's own
numbers, the eval settings change what they should, and the run's prediction pictures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from configs import unet
from experiments import evaluate
from seg import data, visualize
from seg.data import batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


def tiny_config():
    c = unet.get_config()
    c.model.base_channels, c.model.depth = 4, 2
    c.data.image_size, c.data.num_train, c.data.num_val, c.data.num_test = 32, 8, 6, 4
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = 3, 4, 4
    c.train.log_every, c.train.num_pictures = 1, 2
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_synthetic_data, one_thread):
    workdir = tmp_path_factory.mktemp("run") / "unet"
    evaluate._train_script().run(tiny_config(), workdir)
    return workdir


def summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def test_whole_image_eval_reproduces_the_runs_numbers(run_dir):
    record = evaluate.evaluate_run(run_dir, "val")
    last = summary(run_dir)["last_eval"]["val"]
    assert record["step"] == 3 == last["step"]
    assert record["miou"] == last["miou"] and record["loss"] == last["loss"]
    assert record["confusion_matrix"] == last["confusion_matrix"]
    written = json.loads((run_dir / "eval_val.json").read_text())
    assert written["eval"] == {"mode": "whole", "window": [512, 512], "stride": [341, 341],
                               "flip": False, "scales": [1.0]}
    assert written["class_names"] == ["background", "striped_blob", "patterned_polygon"]
    keys = {"pixel_acc", "mean_acc", "miou", "fwiou", "iou_per_class", "acc_per_class",
            "recall_macro", "recall_micro", "dice_macro", "loss", "confusion_matrix", "step"}
    assert keys <= set(written)


def test_slide_and_tta_settings(run_dir):
    test = summary(run_dir)["last_eval"]["test"]
    covering = evaluate.evaluate_run(run_dir, "test", tag="big", mode="slide", window=(64, 64),
                                     stride=(32, 32))
    assert covering["confusion_matrix"] == test["confusion_matrix"]  # one window = whole image
    tiled = evaluate.evaluate_run(run_dir, "test", tag="tiles", mode="slide", window=(16, 16),
                                  stride=(8, 8), flip=True, scales=(0.5, 1.0))
    assert tiled["eval"]["window"] == (16, 16) and tiled["eval"]["scales"] == (0.5, 1.0)
    assert tiled["loss"] != pytest.approx(test["loss"])  # the averaged probabilities' loss
    assert sum(map(sum, tiled["confusion_matrix"])) == sum(map(sum, test["confusion_matrix"]))
    assert (run_dir / "eval_test_tiles.json").exists() and (run_dir / "eval_test_big.json").exists()


def test_bad_settings_and_missing_files_are_errors(run_dir, tmp_path):
    with pytest.raises(ValueError, match="eval.stride"):
        evaluate.evaluate_run(run_dir, "val", mode="slide", window=(8, 8), stride=(16, 16))
    with pytest.raises(ValueError, match="config.json"):
        evaluate.evaluate_run(tmp_path, "val")
    with pytest.raises(ValueError, match="--checkpoint"):
        evaluate.evaluate_run(run_dir, "val", checkpoint_file=tmp_path / "nope.pt")


def test_command_line_prints_the_per_class_table(run_dir):
    ckpt = run_dir / "checkpoints" / "ckpt_00000003.pt"
    proc = subprocess.run([sys.executable, "experiments/evaluate.py", str(run_dir), "--split=test",
                           f"--checkpoint={ckpt}", "--tag=cli"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run_dir / "eval_test_cli.json").read_text())
    assert record["miou"] == summary(run_dir)["last_eval"]["test"]["miou"]
    assert f"| background | {record['iou_per_class'][0]:.4f} |" in proc.stdout
    assert f"| **mean** | {record['miou']:.4f} |" in proc.stdout


def test_a_finished_run_is_not_evaluated_again(run_dir):
    before = (run_dir / "metrics.jsonl").read_text()
    again = evaluate._train_script().run(tiny_config(), run_dir)
    assert again == summary(run_dir) and (run_dir / "metrics.jsonl").read_text() == before


def test_prediction_pictures_of_the_run(run_dir):
    cfg = tiny_config()
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["step_00000003.png"]
    picture = torchvision.io.decode_png(torchvision.io.read_file(
        str(run_dir / "predictions" / "step_00000003.png")))
    assert picture.shape == (3, 2 * 32 + 3 * 2, 3 * 32 + 4 * 2)  # 2 rows of 3 pictures, pad 2
    val = data.build(cfg.data, "val")
    truth = visualize.colorize(val.masks[1], visualize.palette_tensor(val.info.palette, 3))
    assert torch.equal(picture[:, 36:68, 36:68], truth)  # row 1, column 1: its ground truth
    assert torch.equal(picture[:, 2:34, 2:34], val.images[0])  # row 0, column 0: the image
    images, _ = next(batches.eval_batches(val, None, 2))
    assert torch.equal(visualize.unnormalize(images, val.mean, val.std), val.images[:2])
