"""experiments/train.py end to end, on tiny settings: the run directory, resume, and every kind
of mistake reported as one line on stderr (seg/cli.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg.tracking import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.train.steps=6", "--config.train.batch_size=4", "--config.train.eval_every=3",
        "--config.train.log_every=2", "--config.train.checkpoint_every=3",
        "--config.data.image_size=32", "--config.data.num_train=16", "--config.data.num_val=8",
        "--config.data.num_test=8", "--config.train.eval_batch_size=8"]
UNET = ["--config=configs/unet.py", "--config.model.base_channels=4", "--config.model.depth=2"]
EVAL_KEYS = {"pixel_acc", "mean_acc", "miou", "fwiou", "iou_per_class", "acc_per_class",
             "recall_macro", "recall_micro", "dice_macro", "loss"}


def train(workdir, *extra, check=True):
    cmd = [sys.executable, "experiments/train.py", f"--workdir={workdir}", *UNET, *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "w"
    proc = train(workdir)
    return workdir, proc


def test_run_directory_contract(finished_run):
    workdir, proc = finished_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["model"]["name"] == "unet"
    records = read_jsonl(workdir / "metrics.jsonl")
    assert all("step" in r and r["split"] in ("train", "val", "test") for r in records)
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [2, 4, 6]
    for r in records:
        if r["split"] == "train":
            assert {"loss", "lr", "images_per_s", "grad_norm", "step_s", "data_s"} <= set(r)
            assert r["images_per_s"] > 0 and r["grad_norm"] > 0
            assert 0 <= r["data_s"] < r["step_s"]
        else:
            assert EVAL_KEYS <= set(r)
            assert len(r["iou_per_class"]) == 3
            cm = r["confusion_matrix"]
            assert sum(map(sum, cm)) > 0
            assert r["pixel_acc"] == pytest.approx(sum(cm[i][i] for i in range(3)) / sum(map(sum, cm)))
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert [r["step"] for r in records if r["split"] == "test"] == [6]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["model"]["name"] == "unet"
    assert summary["model"]["params"] > 0 and summary["images_per_s"] > 0
    assert summary["last_eval"]["test"]["step"] == 6
    test = summary["last_eval"]["test"]
    assert summary["iou_by_class"]["test"] == dict(zip(summary["class_names"],
                                                       test["iou_per_class"]))
    assert list(summary["iou_by_class"]["test"]) == ["background", "striped_blob",
                                                     "patterned_polygon"]
    assert summary["best_eval"]["miou"] == max(r["miou"] for r in records if r["split"] == "val")
    assert {"torch", "torchvision", "device"} <= set(summary["environment"])
    best = summary["best_eval"]["step"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
        f"best_{best:08d}.pt", "ckpt_00000003.pt", "ckpt_00000006.pt"]
    assert json.loads((workdir / "inference.json").read_text())["class_names"] == \
        summary["class_names"]
    assert "step 6/6" in proc.stdout and "eta" in proc.stdout
    # the startup line comes before any step: where, what, how much data, how many steps
    first = proc.stdout.splitlines()[0]
    assert first.startswith("cpu") and "unet" in first and "16 train / 8 val / 8 test" in first
    assert "4 steps/epoch" in first and "6 steps" in first and "precision fp32" in first


def test_resume_ends_with_the_same_numbers(finished_run, tmp_path):
    workdir, _ = finished_run
    # A run that stopped right after the step-3 checkpoint: the step-6 one and the records after
    # step 3 are gone, and the log ends in a torn line.
    crashed = tmp_path / "crashed"
    shutil.copytree(workdir, crashed)
    (crashed / "checkpoints" / "ckpt_00000006.pt").unlink()
    kept = [line for line in (crashed / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 4]
    (crashed / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 5, "spl')
    proc = train(crashed)
    assert "resumed from step 3" in proc.stdout
    full, resumed = read_jsonl(workdir / "metrics.jsonl"), read_jsonl(crashed / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
    assert strip(resumed) == strip(full)  # same records, same numbers, nothing duplicated


def test_misspelt_override_is_one_line_error(tmp_path):
    proc = train(tmp_path / "w", "--config.optimizer.lrr=0.1", check=False)
    assert proc.returncode != 0
    assert proc.stderr == ("error: --config.optimizer.lrr: no such field (did you mean "
                           "config.optimizer.lr?)\n")
    assert not (tmp_path / "w").exists()


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_config_files_that_do_not_load_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    proc = subprocess.run([sys.executable, "experiments/train.py", f"--config={bad}",
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert _one_line_error(proc) == f"error: {bad}:1: invalid syntax: def get_config(:"
    proc = subprocess.run([sys.executable, "experiments/train.py", "--config=configs/unet.py:nope",
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert _one_line_error(proc).startswith("error: unknown dataset preset 'nope'")
    assert not (tmp_path / "w").exists()


def test_a_dataset_that_is_not_there_is_a_one_line_error(tmp_path):
    """A preset as a user runs it, on a machine whose $SEG_DATASETS lacks the dataset: one
    line naming the folder looked in, the field and the variable; nothing written."""
    missing = tmp_path / "datasets"
    proc = subprocess.run([sys.executable, "experiments/train.py",
                           "--config=configs/pspnet.py:cityscapes", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SEG_DATASETS": str(missing)})
    assert _one_line_error(proc) == (
        f"error: '{missing / 'cityscapes'}' ($SEG_DATASETS/<data.dirname='cityscapes'>; "
        f"data.root unset): no such folder; set --config.data.root=<Cityscapes folder with "
        f"leftImg8bit/ and gtFine/> or SEG_DATASETS=<folder holding cityscapes/>")
    assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    line = _one_line_error(train(tmp_path / "afile", check=False))
    afile = tmp_path / "afile"
    assert line == f"error: workdir {afile}: {afile} is a file, not a folder"
    assert (tmp_path / "afile").read_text() == "keep me"


def test_bad_data_met_in_a_loader_worker_is_a_one_line_error(tmp_path):
    """A truncated JPEG read by a DataLoader worker mid-training: torch re-raises it in the
    main process with the worker's traceback in the message; the user sees the one line."""
    from conftest import write_folder_dataset

    root = write_folder_dataset(tmp_path / "data", {"train": [(24, 24)] * 4,
                                                    "val": [(24, 24)] * 2, "test": []})
    jpeg = root / "train" / "images" / "002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    proc = subprocess.run(
        [sys.executable, "experiments/train.py", f"--workdir={tmp_path / 'w'}", *UNET,
         "--config.data.name=folder", f"--config.data.root={root}", "--config.data.test_split=",
         "--config.data.workers=1", "--config.train.batch_size=2", "--config.train.steps=4",
         "--config.train.eval_batch_size=2"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert _one_line_error(proc) == f"error: {jpeg}: corrupt or truncated JPEG " + \
        proc.stderr.split("corrupt or truncated JPEG ", 1)[1].strip()
    assert (tmp_path / "w" / "config.json").exists()  # what was written stays


@pytest.mark.parametrize("override, field", [
    ("--config.data.num_classes=1", "data.num_classes"),
    ("--config.model.name=segformer", "model.name"),
    ("--config.loss.name=bce", "loss.name"),
    ("--config.optimizer.name=lamb", "optimizer.name"),
    ("--config.train.freeze=('encoder',)", "train.freeze"),
    ("--config.data.scale_range=(2.0,0.5)", "data.scale_range"),
    ("--config.train.precision=fp8", "train.precision"),
    ("--config.optimizer.clip_norm=-1.0", "optimizer.clip_norm"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, override, field):
    proc = train(tmp_path / "w", override, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], proc.stderr


def test_resuming_with_another_config_is_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    before = (other / "metrics.jsonl").read_text()
    proc = train(other, "--config.optimizer.lr=0.5", check=False)
    assert proc.returncode != 0 and "optimizer.lr" in proc.stderr
    assert (other / "metrics.jsonl").read_text() == before  # nothing already written is lost


def test_augmented_run_with_workers_and_no_test_split(tmp_path):
    workdir = tmp_path / "w"
    train(workdir, "--config.data.test_split=", "--config.data.workers=1",
          "--config.data.crop_size=(24,24)", "--config.data.scale_range=(0.5,2.0)",
          "--config.data.perspective=0.2", "--config.train.steps=3")
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(2, "train"), (3, "train"), (3, "val")]
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["last_eval"]) == {"val"}


def test_checkpointing_with_compile_is_a_one_line_error(tmp_path):
    proc = train(tmp_path / "w", "--config.train.checkpoint_activations=True",
                 "--config.train.compile=True", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "train.checkpoint_activations" in lines[0] and "train.compile" in lines[0]


def test_fast_path_fields_reach_the_steps(finished_run, tmp_path):
    fp32, _ = finished_run
    fast = tmp_path / "fast"
    train(fast, "--config.train.precision=bf16", "--config.train.channels_last=True",
          "--config.train.checkpoint_activations=True")
    ref, got = read_jsonl(fp32 / "metrics.jsonl"), read_jsonl(fast / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in ref]
    for a, b in zip(ref, got):  # bf16 forward (train and eval): close, not equal
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    assert any(a["loss"] != b["loss"] for a, b in zip(ref, got))
    saved = torch.load(fast / "checkpoints" / "ckpt_00000006.pt", weights_only=True)
    weight = saved["state"]["params"]["inc.0.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.dtype == torch.float32
