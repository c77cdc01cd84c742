"""What a run shows while it trains (seg/tracking.py, seg/writers.py): the log window's means,
counts and last values, the clock's laps, data waits and pauses, the time left with the
evaluations in it, and the lines printed."""
from __future__ import annotations

import math
import time

import pytest
import torch

from seg import tracking, writers
from seg.tracking import Clock, LogWindow


def metrics(loss, grad_norm, lr, *, finite=True, scale=None, overflow=None, aux=None):
    m = {"loss": torch.tensor(loss), "loss_main": torch.tensor(loss if aux is None else loss - aux)}
    if aux is not None:
        m["loss_aux"] = torch.tensor(aux)
    m.update(lr=torch.tensor(lr, dtype=torch.float64), finite=torch.tensor(finite),
             grad_norm=torch.tensor(grad_norm))
    if scale is not None:
        m.update(loss_scale=torch.tensor(scale), overflow=torch.tensor(overflow))
    return m


def fill(window):
    steps = [metrics(1.0, 2.0, 0.1, scale=4.0, overflow=False, aux=0.25),
             # fp16 overflow: the loss was computed, the gradient norm is inf
             metrics(3.0, math.inf, 0.09, scale=4.0, overflow=True, aux=0.5),
             # a non-finite loss (train.nonfinite='skip'): nothing of it is averaged
             metrics(math.nan, math.nan, 0.08, finite=False, scale=2.0, overflow=True,
                     aux=math.nan),
             metrics(2.0, 4.0, 0.07, scale=2.0, overflow=False, aux=0.75)]
    for i, m in enumerate(steps, start=11):
        window.add(torch.tensor(i), m)


def test_log_window_averages_each_metric_over_its_finite_steps():
    window = LogWindow(torch.device("cpu"))
    fill(window)
    got = window.read()
    assert window.keys == ("loss", "loss_main", "loss_aux", "grad_norm")
    assert got["loss"] == pytest.approx((1 + 3 + 2) / 3)
    assert got["loss_main"] == pytest.approx((0.75 + 2.5 + 1.25) / 3)
    assert got["loss_aux"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert got["grad_norm"] == pytest.approx((2 + 4) / 2)
    assert got["lr"] == pytest.approx(0.07) and got["loss_scale"] == 2.0
    assert got["overflows"] == 2 and got["skipped"] == 1
    assert window.first_bad_step() == 13


def test_log_window_state_round_trips_and_reads_older_checkpoints():
    window = LogWindow(torch.device("cpu"))
    fill(window)
    again = LogWindow(torch.device("cpu"))
    again.load_state_dict(window.state_dict())
    assert again.read() == window.read() and again.steps == 4
    old = LogWindow(torch.device("cpu"))   # the format before per-metric counts
    old.load_state_dict({"keys": ["loss", "loss_main"], "sums": torch.tensor([6.0, 3.0]),
                         "skipped": torch.tensor(1), "first_bad": torch.tensor(13),
                         "lr": torch.tensor(0.07), "steps": 4})
    got = old.read()
    assert got["loss"] == pytest.approx(2.0) and got["loss_main"] == pytest.approx(1.0)
    assert got["lr"] == pytest.approx(0.07) and got["skipped"] == 1 and got["overflows"] == 0


def test_clock_counts_steps_and_the_wait_for_data_and_times_pauses():
    clock = Clock(torch.device("cpu"))

    def slow():
        while True:
            time.sleep(0.02)
            yield 0

    stream = slow()
    for _ in range(3):
        clock.next_batch(stream)
    with clock.paused("eval"):
        time.sleep(0.05)
    lap = clock.lap()
    assert lap.steps == 3 and 0.06 <= lap.data_wait <= lap.seconds
    assert lap.seconds < lap.data_wait + 0.04   # the pause is not train time
    assert clock.mean_pause("eval") >= 0.05 and clock.mean_pause("checkpoint") is None
    assert clock.lap().steps == 0   # a lap starts the count again
    restored = Clock(torch.device("cpu"))
    restored.load_state_dict(clock.state_dict())
    assert restored.mean_pause("eval") == clock.mean_pause("eval")


@pytest.mark.parametrize("steps, every", [(10, 4), (8, 4), (7, 1), (5, 10)])
def test_due_counts_the_evaluations_still_to_come(steps, every):
    for step in range(steps + 1):
        expected = sum(1 for k in range(step + 1, steps + 1) if k % every == 0 or k == steps)
        assert tracking._due(step, steps, every) == expected


def test_time_left_includes_the_evaluations_once_they_were_timed():
    clock = Clock(torch.device("cpu"))
    kw = dict(eval_every=100, checkpoint_every=250, test_fraction=0.5)
    seconds, measured = tracking.remaining_seconds(50, 1000, 0.2, clock, **kw)
    assert not measured and seconds == pytest.approx(950 * 0.2)
    clock._pauses = {"eval": [30.0, 3], "checkpoint": [4.0, 2]}   # 10 s per eval, 2 s per save
    seconds, measured = tracking.remaining_seconds(150, 1000, 0.2, clock, **kw)
    # 850 steps, val evals at 200..1000 (9) and the test eval (half the val set), saves at
    # 250, 500, 750, 1000
    assert measured and seconds == pytest.approx(850 * 0.2 + 9.5 * 10 + 4 * 2)


def test_progress_lines_show_where_the_time_goes():
    record = {"step": 200, "split": "train", "loss": 0.5, "loss_main": 0.4, "loss_aux": 0.25,
              "grad_norm": 1.234, "lr": 0.01, "images_per_s": 64.0, "step_s": 0.25,
              "data_s": 0.05, "peak_mem_gib": 12.25, "loss_scale": 32768.0, "overflows": 1}
    line = writers.progress_line(record, steps=1000, eta_s=3725.4, eta_measured=False)
    for part in ("step 200/1000", "loss 0.5000", "(main 0.4000 aux 0.2500)", "grad 1.234",
                 "64.0 img/s", "step 0.250s (data 0.050s)", "mem 12.2G",
                 "scale 32768 (1 overflowed)", "eta >1:02:05"):
        assert part in line, (part, line)
    assert writers.hms(59.6) == "0:01:00" and writers.hms(36000) == "10:00:00"
    start = writers.startup_line({
        "device": "cuda:0 (NVIDIA H200)", "ranks": 2, "model": "pspnet", "params": 46.7e6,
        "trainable_params": 46.7e6, "images": {"train": 367, "val": 101}, "batch_size": 16,
        "steps_per_epoch": 22, "start": 0, "steps": 1000, "precision": "fp16",
        "compile": True, "channels_last": True})
    for part in ("cuda:0 (NVIDIA H200) x 2 ranks", "46.70M params", "367 train / 101 val",
                 "22 steps/epoch", "precision fp16", "compile", "channels_last"):
        assert part in start, (part, start)
