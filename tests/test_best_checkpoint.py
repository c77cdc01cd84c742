"""The best-on-val weights (train.best_metric, checkpoints/best_<step>.pt): chosen by the
configured key, weights only, the ones evaluate / predict / export get with
--checkpoint=best, and right after a run resumes from a checkpoint older than its last best."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import tiny_unet
from seg import evaluation, loop, rundir
from seg.tracking import EvalHistory

pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


def test_the_best_record_by_key_and_direction():
    def val(step, **values):
        return {"step": step, "split": "val", **values}

    history = EvalHistory("miou")
    added = [history.add(r) for r in (val(1, miou=math.nan), val(2, miou=0.3),
                                      {"step": 2, "split": "test", "miou": 0.9},
                                      val(3, miou=0.5), val(4, miou=0.5), val(5, miou=0.4))]
    assert added == [True, True, False, True, False, False]   # a tie keeps the earlier one
    assert history.best["step"] == 3 and history.last["test"]["miou"] == 0.9
    losses = EvalHistory("loss")   # a loss: the lowest wins
    for r in (val(1, loss=0.9), val(2, loss=0.4), val(3, loss=None), val(4, loss=0.6)):
        losses.add(r)
    assert losses.best["step"] == 2


def tiny_config(steps=4):
    return tiny_unet(train__steps=steps, train__log_every=2, train__eval_every=2,
                     train__checkpoint_every=2, train__deterministic=True,
                     train__best_metric="pixel_acc")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_synthetic_data, one_thread):
    workdir = tmp_path_factory.mktemp("run") / "w"
    loop.train_and_evaluate(tiny_config(), workdir)
    return workdir


def records(workdir, split="val"):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == split]


def test_the_best_weights_are_kept_and_evaluate_reproduces_their_eval(finished):
    summary = json.loads((finished / "summary.json").read_text())
    best = summary["best_eval"]
    vals = records(finished)
    assert best["pixel_acc"] == max(r["pixel_acc"] for r in vals)
    assert best["step"] == min(r["step"] for r in vals if r["pixel_acc"] == best["pixel_acc"])
    files = rundir.RunDir(finished).best_files()
    assert [step for step, _ in files] == [best["step"]]
    saved = torch.load(files[0][1], weights_only=True)
    assert sorted(saved["state"]) == ["buffers", "params", "step"]   # no optimizer state
    assert saved["best"] == {"metric": "pixel_acc", "pixel_acc": best["pixel_acc"]}
    record = evaluation.evaluate_run(finished, "val", checkpoint="best", tag="best")
    assert record["step"] == best["step"] and record["checkpoint"] == str(files[0][1])
    assert record["confusion_matrix"] == best["confusion_matrix"]
    last = evaluation.evaluate_run(finished, "val", checkpoint="last", tag="last")
    assert last["step"] == 4


def test_a_resumed_run_drops_the_best_weights_of_steps_it_redoes(
        finished, tmp_path, monkeypatch):
    """Killed after the eval of step 4 wrote its best weights but before the step-4 checkpoint:
    the run resumes from step 2, whose history knows only the eval of step 2, so the killed
    run's best file of step 4 must not survive (on a GPU the redone steps can differ). Here it
    holds zeros: the run ends with the uninterrupted run's best weights all the same."""
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    run = rundir.RunDir(workdir)
    (workdir / "checkpoints" / "ckpt_00000004.pt").unlink()
    at2 = torch.load(workdir / "checkpoints" / "ckpt_00000002.pt", weights_only=True)
    assert at2["evals"]["best"]["step"] == 2   # the only val eval before it
    for step, path in run.best_files():
        path.unlink()
    state = {k: at2["state"][k] for k in ("step", "params", "buffers")}
    torch.save({"state": state, "best": {}}, workdir / "checkpoints" / "best_00000002.pt")
    bogus = {**state, "step": torch.tensor(4),
             "params": {k: torch.zeros_like(v) for k, v in state["params"].items()}}
    torch.save({"state": bogus, "best": {}}, workdir / "checkpoints" / "best_00000004.pt")

    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    with monkeypatch.context() as m:   # stopped right after resuming, before any step
        m.setattr(loop.batches, "train_batches", stop)
        with pytest.raises(Stopped):
            loop.train_and_evaluate(tiny_config(), workdir)
    assert [step for step, _ in run.best_files()] == [2]
    loop.train_and_evaluate(tiny_config(), workdir)
    [(step, path)] = run.best_files()
    [(ref_step, ref_path)] = rundir.RunDir(finished).best_files()
    assert step == ref_step
    got, want = (torch.load(p, weights_only=True)["state"]["params"] for p in (path, ref_path))
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_best_metric_must_be_an_eval_number(tmp_path):
    from seg import errors

    cfg = tiny_config()
    cfg.train.best_metric = "iou_per_class"
    with pytest.raises(errors.ConfigError, match="train.best_metric='iou_per_class' is not one "
                       "of .*'miou'"):
        loop.train_and_evaluate(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
