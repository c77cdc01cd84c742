"""train.num_seeds end to end (seg/seeds_loop.py): experiments/train.py writes <workdir>/seed<s>/
run directories that equal separate runs of their seeds and that evaluate, report and the
sweeps read as such; resuming the stacked state is bitwise; the ablation sweep's --vmap."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import unet
from seg import errors, evaluation, loop, report, seeds_loop, sweep, tracking

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"model.base_channels": 4, "model.depth": 2, "data.image_size": 32,
            "data.num_train": 16, "data.num_val": 8, "data.num_test": 8, "train.steps": 6,
            "train.batch_size": 4, "train.log_every": 2, "train.eval_every": 3,
            "train.checkpoint_every": 3, "train.eval_batch_size": 8, "train.num_pictures": 2}
pytestmark = pytest.mark.usefixtures("one_thread")


def config(seed=0, num_seeds=1, **extra):
    c = unet.get_config()
    for key, value in {**SETTINGS, **extra}.items():
        section, field = key.split(".")
        c[section][field] = value
    c.seed, c.train.num_seeds = seed, num_seeds
    return c


def records(workdir):
    """metrics.jsonl, timings dropped."""
    return [{k: v for k, v in json.loads(line).items() if k not in tracking.TIMING_KEYS}
            for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir):
    return torch.load(Path(workdir) / "checkpoints" / "ckpt_00000006.pt",
                      weights_only=True)["state"]


def flips_tolerance(record: dict, pixels: int) -> float:
    """How far mIoU moves when `pixels` predictions change class: each change takes one pixel
    from one class's IoU and gives it to another's, moving each by at most 1 / (its union - 1),
    so mIoU by at most 2 / (classes counted * (smallest union - 1)) per pixel."""
    cm = torch.tensor(record["confusion_matrix"], dtype=torch.float64)
    union = cm.sum(0) + cm.sum(1) - cm.diag()
    counted = union[union > 0]
    return float(pixels * 2 / (len(counted) * (counted.min() - 1)))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """experiments/train.py --config.train.num_seeds=2, as the issue's command, tiny."""
    workdir = tmp_path_factory.mktemp("group") / "w"
    cmd = [sys.executable, "experiments/train.py", f"--workdir={workdir}",
           "--config=configs/unet.py", "--config.train.num_seeds=2",
           *(f"--config.{k}={v}" for k, v in SETTINGS.items())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return workdir, proc.stdout


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("separate") / "seed1"
    loop.train_and_evaluate(config(seed=1), workdir)
    return workdir


def test_members_are_ordinary_run_directories(group):
    workdir, stdout = group
    assert json.loads((workdir / "config.json").read_text())["train"]["num_seeds"] == 2
    for seed in (0, 1):
        member = workdir / f"seed{seed}"
        cfg = json.loads((member / "config.json").read_text())
        assert (cfg["seed"], cfg["train"]["num_seeds"]) == (seed, 1)  # its separate run's config
        for name in ("inference.json", "summary.json", "metrics.jsonl",
                     "checkpoints/ckpt_00000006.pt", "predictions/step_00000006.png",
                     "per_image/val.npz", "per_image/test.npz"):
            assert (member / name).is_file(), name
        assert list((member / "checkpoints").glob("best_*.pt"))
        summary = json.loads((member / "summary.json").read_text())
        assert summary["vmap_group"] == {"num_seeds": 2, "member": seed, "first_seed": 0,
                                         "workdir": str(workdir)}
        assert summary["steps"] == 6 and summary["last_eval"]["test"]["step"] == 6
        assert f"seed{seed}  step 6  val miou" in stdout
    grouped = json.loads((workdir / "seeds.json").read_text())
    assert [r["seed"] for r in grouped["runs"]] == [0, 1] and grouped["val_miou"]["n"] == 2
    assert len(report.find_runs([str(workdir / "seed*")])) == 2


def test_a_member_equals_the_separate_run_of_its_seed(group, separate):
    """W/seed1 against --config.seed=1 alone: same records, the numbers equal up to the
    rounding of the batched kernels (tests/test_seeds.py says why 1e-3 bounds it for losses);
    val mIoU up to the changed predictions of at most 8 of the 8192 val pixels, pixels whose
    two largest logits lie closer than that rounding."""
    member, alone = records(group[0] / "seed1"), records(separate)
    assert [(r["step"], r["split"]) for r in member] == [(r["step"], r["split"]) for r in alone]
    for a, b in zip(member, alone):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        if a["split"] != "train":
            assert abs(a["miou"] - b["miou"]) <= flips_tolerance(b, 8), (a["step"], a["split"])
    state, ref = final_state(group[0] / "seed1"), final_state(separate)
    for name, v in ref["buffers"].items():
        if "running" in name:  # BatchNorm statistics
            assert torch.allclose(state["buffers"][name], v, rtol=1e-3, atol=1e-6), name


def test_evaluate_reads_a_member_as_a_run(group):
    member = group[0] / "seed1"
    last_val = [r for r in records(member) if r["split"] == "val"][-1]
    record = evaluation.evaluate_run(member, "val")
    assert record["miou"] == last_val["miou"] and record["loss"] == last_val["loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "w"
    loop.train_and_evaluate(config(num_seeds=2), workdir)
    return workdir


def assert_same_run(workdir, reference):
    for seed in (0, 1):
        assert records(workdir / f"seed{seed}") == records(reference / f"seed{seed}")
        a, b = final_state(workdir / f"seed{seed}"), final_state(reference / f"seed{seed}")
        for part in ("params", "buffers"):
            assert all(torch.equal(a[part][k], v) for k, v in b[part].items()), (seed, part)


def test_resuming_the_stacked_state_is_bitwise(reference, tmp_path, capsys):
    """Killed before its last checkpoint: each member's step-3 checkpoint stacked again, and
    the run ends bitwise as the uninterrupted one (records, params, BN statistics)."""
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    for seed in (0, 1):
        (workdir / f"seed{seed}" / "checkpoints" / "ckpt_00000006.pt").unlink()
    loop.train_and_evaluate(config(num_seeds=2), workdir)
    assert "seed1  resumed from step 3" in capsys.readouterr().out
    assert_same_run(workdir, reference)


def test_a_member_behind_takes_the_group_back_to_their_common_checkpoint(reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    newest = workdir / "seed1" / "checkpoints" / "ckpt_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: seed0 alone has step 6
    with pytest.warns(UserWarning, match=f"checkpoint {newest} is unreadable"):
        loop.train_and_evaluate(config(num_seeds=2), workdir)
    assert_same_run(workdir, reference)


def test_a_finished_group_is_read_back(reference, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)

    def no_batches(*args, **kwargs):
        raise AssertionError("a finished group trained again")

    monkeypatch.setattr(seeds_loop.batches, "member_batches", no_batches)
    result = loop.train_and_evaluate(config(num_seeds=2), workdir)
    assert "its 2 members have finished" in capsys.readouterr().out
    assert result == json.loads((workdir / "seeds.json").read_text())
    assert_same_run(workdir, reference)


def test_refused_combinations_are_one_line_errors(tmp_path):
    cmd = [sys.executable, "experiments/train.py", f"--workdir={tmp_path / 'w'}",
           "--config=configs/unet.py", *(f"--config.{k}={v}" for k, v in SETTINGS.items()),
           "--config.train.num_seeds=2", "--config.train.nonfinite=skip"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "nonfinite='skip'" in lines[0], lines
    with pytest.raises(errors.ConfigError, match="train.num_seeds=0 must be positive"):
        loop.train_and_evaluate(config(num_seeds=0), tmp_path / "w")
    with pytest.raises(ValueError, match="run the seeds as separate jobs"):
        loop.check_train(config(num_seeds=2), 2, torch.device("cpu"))  # under torchrun
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_sweep_vmap_writes_the_same_layout(tmp_path, monkeypatch):
    """--vmap: one run of train.num_seeds per variant, its members the <variant>/seed<k>
    directories; a sweep without --vmap then reads them back as its own finished runs."""
    configs = {"drop": config(), "nodrop": config(**{"model.dropout": 0.0})}
    result = sweep.run_sweep(configs, tmp_path, seeds=[0, 1], steps=3, vmap=True)
    for name in configs:
        assert json.loads((tmp_path / name / "config.json").read_text())["train"]["num_seeds"] == 2
        for seed in (0, 1):
            cfg = json.loads((tmp_path / name / f"seed{seed}" / "config.json").read_text())
            assert (cfg["seed"], cfg["train"]["num_seeds"], cfg["train"]["steps"]) == (seed, 1, 3)
        assert [r["seed"] for r in result["variants"][name]["runs"]] == [0, 1]

    def no_training(cfg, workdir):
        raise AssertionError(f"{workdir} trained again")

    monkeypatch.setattr(loop, "train_and_evaluate", no_training)
    again = sweep.run_sweep(configs, tmp_path, seeds=[0, 1], steps=3)
    assert again["variants"] == result["variants"]
    with pytest.raises(errors.ConfigError, match="not consecutive"):
        sweep.run_sweep(configs, tmp_path, seeds=[0, 2], steps=3, vmap=True)
