"""experiments/gpu_check.py --tiny on the CPU: every section's code path runs and writes what a
GPU run would write, so the script is known to work before a GPU is booked; a failing section
is recorded and the others still run; bad input is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import benchmarks
from seg import gpu_check
from seg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gc")
    proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--tiny", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc


def test_tiny_run_writes_every_section(tiny_run):
    out, report, proc = tiny_run
    assert set(gpu_check.SECTIONS) <= set(report)
    assert report["tiny"] and report["environment"]["torch"]
    assert report["wall_s"] < 180
    md = (out / "gpu_check.md").read_text()
    for name in gpu_check.SECTIONS:
        assert f"## {name}: " in md and f"## {name}: " in proc.stdout
    assert "| UNet, base 16 | 2 | 2 |" in md   # the train.num_seeds table


def test_tiny_correctness_section_checks_what_it_says(tiny_run):
    _, report, _ = tiny_run
    c = report["correctness"]
    assert c["status"] == "passed", c
    checks = c["checks"]
    for name in ("step_vs_imperative/unet", "step_vs_imperative/pspnet_r18"):
        # on the CPU the functional step and the imperative loop agree bit for bit
        assert checks[name]["passed"] and checks[name]["bitwise"], checks[name]
    opt = checks["optimizers"]
    for name in ("sgd_momentum", "sgd_nesterov", "adam", "adamw"):
        assert opt[name]["fused_max_ulp"] == 0 and opt[name]["foreach_max_ulp"] == 0
        assert set(opt[name]["ms_per_update"]) == {"ours_foreach", "ours_fused",
                                                   "torch_foreach", "torch_fused"}
    compiled = checks["compile"]
    assert compiled["graphs"] == 1 and compiled["recompiled"] is None and compiled["steps"] == 20
    assert checks["host_sync"]["passed"] is None   # CUDA only


def test_tiny_benchmark_loader_and_training_sections_hold_numbers(tiny_run):
    _, report, _ = tiny_run
    b = report["benchmark"]
    assert b["status"] == "done" and b["matmul_peak_tflops"] > 0
    (unet,) = b["models"]
    assert set(unet["modes"]) == {"imperative", "eager", "fast"}
    for m in unet["modes"].values():
        assert m["images_per_s"] > 0 and 0 < m["mfu"] and m["tflops"] > 0
    (vmapped,) = b["vmap_seeds"]   # train.num_seeds=2 against two steps in turn
    assert (vmapped["label"], vmapped["num_seeds"], vmapped["precision"]) == ("UNet, base 16",
                                                                              2, "bf16")
    assert vmapped["vmap_s"] > 0 and vmapped["sequential_s"] > 0 and vmapped["speedup"] > 0
    loader = report["loader"]
    assert [r["workers"] for r in loader["rows"]] == [0, 1]
    assert all(r["images_per_s"] > 0 for r in loader["rows"])
    assert loader["fast_steps"] and "fed" in loader["fast_steps"][0]
    t = report["training"]
    assert t["status"] == "done" and t["steps_done"] == t["steps_planned"] == 4
    assert 0 <= t["val"]["miou"] <= 1 and t["images_per_s"] > 0
    assert 0 <= t["data_wait_share"] < 1 and t["precision"] == "bf16"


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(gpu_check, "correctness", lambda ctx: {"status": "passed", "checks": {}})
    monkeypatch.setattr(gpu_check, "benchmark", broken)
    plan = benchmarks.gpu_check(tiny=True)
    plan.training.config.train.steps = 2
    plan.training.config.train.update(eval_every=2, checkpoint_every=2)
    report = gpu_check.run(plan, tmp_path)
    assert report["benchmark"]["status"] == "error"
    assert "out of memory, say" in report["benchmark"]["error"]
    assert report["loader"]["status"] == "done" and report["training"]["status"] == "done"
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["benchmark"]["status"] == "error" and saved["training"]["steps_done"] == 2
    assert "## benchmark: error" in (tmp_path / "gpu_check.md").read_text()


def test_the_training_steps_fit_the_time_left():
    plan = benchmarks.gpu_check(tiny=False, camvid_root="/nonexistent")
    ctx = gpu_check.Context.__new__(gpu_check.Context)
    ctx.plan, ctx.fast_mode = plan, "fast"
    ctx.end = gpu_check.time.perf_counter() + 300.0
    ctx.report = {"benchmark": {"models": [{"model": "pspnet", "image_size": 512,
                                            "modes": {"fast": {"images_per_s": 120.0}}}]},
                  "loader": {"rows": [{"images_per_s": 500.0}, {"images_per_s": 900.0}]}}
    cfg = plan.training.config
    # the fast step at 352x480 is 120 * 512**2 / (352 * 480) = 186 images/s, slower than the
    # loader's 900: 0.8 * (300 - 90 - 2 * 10) s * 186 / 16 = 1767 steps (to a second's slack)
    steps = gpu_check.fit_steps(ctx, cfg)
    expected = 0.8 * (300 - 90 - 20) * (120 * 512 ** 2 / (352 * 480)) / 16
    assert abs(steps - expected) < 2
    ctx.report = {}
    assert gpu_check.fit_steps(ctx, cfg) == plan.training.min_steps   # nothing measured


def test_missing_data_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="loader.data: no CamVid folder at '/nonexistent'"):
        gpu_check.run(benchmarks.gpu_check(tiny=False, camvid_root="/nonexistent"), tmp_path)
    assert not (tmp_path / "gpu_check.json").exists()
    proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--tiny",
                           "--camvid_root=/nonexistent", f"--out={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "--camvid_root" in lines[0], proc.stderr
