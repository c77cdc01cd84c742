"""seg/report.py (experiments/report.py) on two hand-written run directories: rows, values,
class columns, and plots drawn or skipped with the reason."""
from __future__ import annotations

import importlib.util
import json

import pytest

from seg import report


def make_run(path, name, params, classes, val_iou, miou, steps=100, wall=65.2, ips=12.5,
             test_miou=None):
    path.mkdir(parents=True)
    val = {"step": steps, "split": "val", "miou": miou,
           "pixel_acc": 0.9, "iou_per_class": val_iou, "loss": 0.4}
    last = {"val": val}
    if test_miou is not None:
        last["test"] = {"step": steps, "split": "test", "miou": test_miou}
    summary = {"model": {"name": name, "params": params}, "steps": steps, "wall_time_s": wall,
               "train_time_s": wall - 5, "images_per_s": ips, "class_names": classes,
               "last_eval": last, "best_eval": val}
    (path / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": 50, "split": "train", "loss": 0.8}, {"step": 100, "split": "train",
                                                             "loss": 0.5}, val]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines)
                                        + '{"step": 101, "spl')  # a torn last line


@pytest.fixture
def two_runs(tmp_path):
    make_run(tmp_path / "sweep" / "a" / "seed0", "unet", 31_042_435, ["background", "cat"],
             [0.9, 0.5], 0.7, test_miou=0.65)
    make_run(tmp_path / "sweep" / "b" / "seed0", "pspnet", 1234, ["background", "cat", "dog"],
             [0.8, None, 0.25], None, steps=20, wall=3725, ips=101.25)
    return tmp_path / "sweep"


def test_table_rows_and_values(two_runs):
    runs = report.load_runs([str(two_runs / "*" / "seed0")])
    lines = report.table(runs).splitlines()
    assert lines[0] == ("| run | model | params | steps | wall time | images/s | val mIoU | "
                        "val pixel acc | test mIoU | IoU background | IoU cat | IoU dog |")
    assert lines[2] == ("| a/seed0 | unet | 31.04M | 100 | 1 min 5 s | 12.5 | 0.7000 | 0.9000 | "
                        "0.6500 | 0.9000 | 0.5000 | n/a |")
    assert lines[3] == ("| b/seed0 | pspnet | 1.2k | 20 | 62 min 5 s | 101.2 | n/a | 0.9000 | "
                        "n/a | 0.8000 | n/a | 0.2500 |")
    assert len(lines) == 4
    assert [len(r["records"]) for r in runs] == [3, 3]  # the torn line is skipped


def test_patterns_and_errors(two_runs):
    a = two_runs / "a" / "seed0"
    runs = report.find_runs([str(a), str(two_runs / "*" / "seed0")])
    assert runs == [a, two_runs / "b" / "seed0"]  # in order, each once
    with pytest.raises(ValueError, match="no run directory"):
        report.find_runs([str(two_runs / "missing*")])


def test_report_file_and_plots(two_runs, tmp_path):
    out = tmp_path / "out" / "report.md"
    text, done = report.write_report([str(two_runs / "*" / "seed0")], out)
    assert out.read_text() == text and report.table(
        report.load_runs([str(two_runs / "*" / "seed0")])) in text
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib is not installed" in done[0]
        assert "Plots skipped: matplotlib is not installed." in text
        assert not list(out.parent.glob("*.png"))
    else:
        for name in ("report_curves.png", "report_per_class_iou.png"):
            assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in text
    text, done = report.write_report([str(two_runs / "*" / "seed0")], out, plots=False)
    assert "Plots" not in text and len(done) == 1
