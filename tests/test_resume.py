"""Crash safety of the training loop: a run killed with SIGKILL and restarted, or resumed past
a truncated checkpoint, ends with bitwise the numbers of an uninterrupted run; and the same
config and seed give bitwise the same run (in this process or another)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configs import unet
from seg import loop
from seg.tracking import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
# 48 short steps: about a second of training after the first checkpoint, time to kill it
SETTINGS = {"model.base_channels": 4, "model.depth": 2, "data.image_size": 32,
            "data.num_train": 16, "data.num_val": 8, "data.num_test": 8, "train.steps": 48,
            "train.batch_size": 4, "train.log_every": 4, "train.eval_every": 8,
            "train.checkpoint_every": 8, "train.eval_batch_size": 8,
            "train.deterministic": True}

pytestmark = pytest.mark.usefixtures("one_thread")


def config():
    c = unet.get_config()
    for key, value in SETTINGS.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def command(workdir):
    return [sys.executable, "experiments/train.py", f"--workdir={workdir}",
            "--config=configs/unet.py", *(f"--config.{k}={v}" for k, v in SETTINGS.items())]


def records(workdir):
    """metrics.jsonl parsed line by line (a torn line would raise), timings dropped."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_same_final_state(workdir, reference):
    a, b = (torch.load(w / "checkpoints" / "ckpt_00000048.pt", weights_only=True)["state"]
            for w in (workdir, reference))
    for part in ("params", "buffers"):
        for k, v in b[part].items():
            assert torch.equal(a[part][k], v), (part, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "w"
    loop.train_and_evaluate(config(), workdir)
    return workdir


def test_killed_run_restarted_ends_with_the_same_numbers(reference, tmp_path):
    workdir = tmp_path / "w"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = workdir / "checkpoints" / "ckpt_00000008.pt"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, f"train.py ended early:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed while training, not after it
    assert not (workdir / "checkpoints" / "ckpt_00000048.pt").exists()

    resumed = subprocess.run(command(workdir), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    # another process than the reference's: the same numbers, nothing lost or repeated
    assert records(workdir) == records(reference)
    assert_same_final_state(workdir, reference)
    summary, ref_summary = (json.loads((w / "summary.json").read_text())
                            for w in (workdir, reference))
    assert summary["steps"] == 48 and summary["last_eval"] == ref_summary["last_eval"]


def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(
        reference, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    latest = workdir / "checkpoints" / "ckpt_00000048.pt"
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"checkpoint {latest} is unreadable"):
        loop.train_and_evaluate(config(), workdir)
    assert "resumed from step 40" in capsys.readouterr().out
    assert records(workdir) == records(reference)  # the test record is redone, not repeated
    assert_same_final_state(workdir, reference)


def test_same_config_and_seed_give_bitwise_the_same_run(reference, tmp_path):
    again = tmp_path / "again"
    loop.train_and_evaluate(config(), again)
    assert len(records(again)) == 12 + 6 + 1  # train every 4, val every 8, test
    assert records(again) == records(reference)
    assert_same_final_state(again, reference)


def test_restarting_a_finished_run_repeats_no_record(reference, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    loop.train_and_evaluate(config(), workdir)
    assert "resumed from step 48" in capsys.readouterr().out
    assert records(workdir) == records(reference)  # one test record, evaluated again


def test_deterministic_switch_is_scoped():
    from seg import runtime

    before = torch.are_deterministic_algorithms_enabled()
    with runtime.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert torch.are_deterministic_algorithms_enabled() == before
