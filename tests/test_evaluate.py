"""Evaluating a finished run (seg.evaluation, experiments/evaluate.py) on a tiny trained run:
the restored model reproduces the run's own numbers, the eval settings change what they should,
and the run's prediction pictures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import tiny_unet, trained_tiny_unet
from seg import data, errors, evaluation, loop, visualize
from seg.data import batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


def tiny_config():
    return tiny_unet(train__eval_batch_size=4, train__log_every=1, train__num_pictures=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_synthetic_data, one_thread):
    return trained_tiny_unet(tmp_path_factory, train__eval_batch_size=4, train__log_every=1,
                             train__num_pictures=2)


def summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def test_whole_image_eval_reproduces_the_runs_numbers(run_dir):
    record = evaluation.evaluate_run(run_dir, "val")
    last = summary(run_dir)["last_eval"]["val"]
    assert record["step"] == 3 == last["step"]
    assert record["miou"] == last["miou"] and record["loss"] == last["loss"]
    assert record["confusion_matrix"] == last["confusion_matrix"]
    written = json.loads((run_dir / "eval_val.json").read_text())
    assert written["eval"] == {"mode": "whole", "window": [512, 512], "stride": [341, 341],
                               "flip": False, "scales": [1.0], "per_image": True,
                               "scale_to": []}
    assert written["class_names"] == ["background", "striped_blob", "patterned_polygon"]
    keys = {"pixel_acc", "mean_acc", "miou", "fwiou", "iou_per_class", "acc_per_class",
            "recall_macro", "recall_micro", "dice_macro", "loss", "confusion_matrix", "step"}
    assert keys <= set(written)


def test_slide_and_tta_settings(run_dir):
    test = summary(run_dir)["last_eval"]["test"]
    covering = evaluation.evaluate_run(run_dir, "test", tag="big", mode="slide", window=(64, 64),
                                     stride=(32, 32))
    assert covering["confusion_matrix"] == test["confusion_matrix"]  # one window = whole image
    tiled = evaluation.evaluate_run(run_dir, "test", tag="tiles", mode="slide", window=(16, 16),
                                  stride=(8, 8), flip=True, scales=(0.5, 1.0))
    assert tiled["eval"]["window"] == (16, 16) and tiled["eval"]["scales"] == (0.5, 1.0)
    assert tiled["loss"] != pytest.approx(test["loss"])  # the averaged probabilities' loss
    assert sum(map(sum, tiled["confusion_matrix"])) == sum(map(sum, test["confusion_matrix"]))
    assert (run_dir / "eval_test_tiles.json").exists() and (run_dir / "eval_test_big.json").exists()


def test_bad_settings_and_missing_files_are_errors(run_dir, tmp_path):
    with pytest.raises(errors.ConfigError, match="eval.stride"):
        evaluation.evaluate_run(run_dir, "val", mode="slide", window=(8, 8), stride=(16, 16))
    with pytest.raises(errors.ConfigError, match="config.json"):
        evaluation.evaluate_run(tmp_path, "val")
    with pytest.raises(errors.ConfigError, match="--checkpoint"):
        evaluation.evaluate_run(run_dir, "val", checkpoint=tmp_path / "nope.pt")


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
    again = loop.train_and_evaluate(tiny_config(), run_dir)
    assert again == summary(run_dir) and (run_dir / "metrics.jsonl").read_text() == before


def test_prediction_pictures_of_the_run(run_dir):
    cfg = tiny_config()
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["step_00000003.png"]
    picture = torchvision.io.decode_png(torchvision.io.read_file(
        str(run_dir / "predictions" / "step_00000003.png")))
    # 2 rows of 3 panels, 32x32 images enlarged 8x (nearest) to 256, 2-pixel gaps
    assert picture.shape[-1] == 3 * 256 + 4 * 2
    val = data.build(cfg.data, "val")
    image = val.images[0].repeat_interleave(8, 1).repeat_interleave(8, 2)
    top = [y for y in range(picture.shape[1] - 256)
           if torch.equal(picture[:, y:y + 256, 2:258], image)]
    assert len(top) == 1 and top[0] > 10   # under a row of column titles
    y = top[0]
    assert (picture[:, :y - 2] < 128).any()   # dark title text on white
    palette = visualize.palette_tensor(val.info.palette, 3)
    truth = visualize.colorize(val.masks[1], palette).repeat_interleave(8, 1)
    assert torch.equal(picture[:, y + 258:y + 514, 260:516], truth.repeat_interleave(8, 2))
    legend = picture[:, y + 516:]
    assert legend.shape[1] > 10   # a legend under the panels, with a swatch of each class
    for colour in palette.tolist():   # the ground truth of the first images has every class
        assert (legend == torch.tensor(colour).view(3, 1, 1)).all(0).sum() >= 9
    images, _ = next(batches.eval_batches(val, None, 2))
    assert torch.equal(visualize.unnormalize(images, val.mean, val.std), val.images[:2])


# ---------------------------------------------------------------- images of mixed sizes

MIXED = [(20, 30), (33, 17), (8, 40), (32, 32), (25, 26), (40, 21), (17, 17), (29, 35)]


class Float64(torch.nn.Module):
    """Runs a model in float64: batched and single-image kernels then agree to ~1e-16, far
    below any gap between two logits, so no argmax can flip between two batchings."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double())


def _eval_mixed(batch_size: int, pad_multiple: int = 8) -> dict:
    from conftest import palette_coded

    import ml_collections
    from seg import functional, losses, models
    from seg import train as seg_train
    from seg.data import Split

    g = torch.Generator().manual_seed(0)
    masks = [torch.randint(0, 4, s, generator=g, dtype=torch.uint8) for s in MIXED]
    unet = ml_collections.ConfigDict(dict(name="unet", base_channels=4, depth=2))
    model, params, buffers = functional.init(lambda: Float64(models.build(unet, 4)), seed=0)
    params = {k: v.double() for k, v in params.items()}
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in buffers.items()}
    cfg = ml_collections.ConfigDict({
        "data": {"workers": 0, "pad_multiple": pad_multiple, "prefetch": 2},
        "train": {"eval_batch_size": batch_size}})
    eval_step = seg_train.make_eval_step(model, losses.cross_entropy, 4)
    return evaluation.evaluate_split(eval_step, params, buffers,
                                     Split(palette_coded(masks), None), cfg, "cpu")


def test_metrics_and_loss_do_not_depend_on_the_eval_batch_size_with_mixed_sizes():
    one = _eval_mixed(1)
    assert sum(map(sum, one["confusion_matrix"])) == sum(h * w for h, w in MIXED)
    for batch_size in (3, 7, 8):
        other = _eval_mixed(batch_size)
        assert other["confusion_matrix"] == one["confusion_matrix"]
        assert other["miou"] == pytest.approx(one["miou"], rel=1e-12)
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-12)
    # what a network sees of an image does change its predictions (so the equality above is
    # not that of a model blind to the padding): here, padding to a multiple of 64 instead of 8
    assert _eval_mixed(1, pad_multiple=64)["confusion_matrix"] != one["confusion_matrix"]


def test_evaluating_a_trained_run_with_eval_batch_1_and_7(tmp_path):
    """The same on a run trained on a folder dataset of mixed sizes, in the run's own float32:
    batched and single-image kernels round differently (~1e-7 relative), which moves the loss by
    about that much (5e-9 measured) and could flip an argmax whose top two logits are within
    that of each other, so the matrices may differ by such pixels: far fewer than 0.1%. Before
    each image was padded on its own, 9-16% of a small image's pixels changed class."""
    from conftest import write_folder_dataset

    root = write_folder_dataset(tmp_path / "data", {"train": [(32, 32)] * 8, "val": MIXED,
                                                    "test": []})
    cfg = tiny_config()
    cfg.data.update(name="folder", root=str(root), test_split="", crop_size=(24, 24))
    cfg.train.update(steps=4, eval_every=4, num_pictures=0)
    loop.train_and_evaluate(cfg, tmp_path / "w")
    one = evaluation.evaluate_run(tmp_path / "w", "val", batch_size=1, tag="b1")
    seven = evaluation.evaluate_run(tmp_path / "w", "val", batch_size=7, tag="b7")
    assert seven["loss"] == pytest.approx(one["loss"], rel=1e-5)
    moved = sum(abs(a - b) for ra, rb in zip(one["confusion_matrix"], seven["confusion_matrix"])
                for a, b in zip(ra, rb)) / 2
    assert moved <= 1e-3 * sum(h * w for h, w in MIXED)


def test_per_image_results_recompute_the_split_numbers(run_dir):
    """The loop's latest eval of each split and evaluate.py's both save every image's counts;
    summed they are the split's confusion-matrix totals, and any subset gives its own scores."""
    import numpy as np
    from seg import metrics, rundir

    record = evaluation.evaluate_run(run_dir, "test", tag="per_image_check")
    for name, expected in (("test", summary(run_dir)["last_eval"]["test"]),
                           ("eval_test_per_image_check", record)):
        saved = rundir.load_per_image(run_dir / "per_image" / f"{name}.npz")
        cm = np.array(expected["confusion_matrix"])
        assert saved.split == "test" and saved.step == 3 and list(saved.index) == [0, 1, 2, 3]
        assert saved.class_names == ("background", "striped_blob", "patterned_polygon")
        assert (saved.counts.sum(0) == np.stack([cm.diagonal(), cm.sum(1), cm.sum(0)], -1)).all()
        whole = metrics.count_scores(torch.from_numpy(saved.counts.sum(0)))
        assert whole["miou"].item() == pytest.approx(expected["miou"], abs=1e-12)
