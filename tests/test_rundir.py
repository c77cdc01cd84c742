"""seg/rundir.py, the run directory's one home, and seg/config.py's dotted-path walks."""
from __future__ import annotations

import json
import math
import re

import ml_collections
import pytest
import torch

from configs import common, unet
from seg import config, errors, rundir


def test_notebook_reader_gives_config_records_and_summary(tmp_path):
    run = rundir.RunDir(tmp_path / "w")
    cfg = unet.get_config()
    run.write_config(cfg)
    run.log.append({"step": 1, "split": "train", "loss": 0.5, "lr": torch.tensor(0.1)})
    run.log.append({"step": 2, "split": "val", "miou": math.nan, "iou_per_class": [0.5, None]})
    with open(run.log.path, "a") as f:
        f.write('{"step": 3, "spl')  # a run killed mid-write
    run.write_summary({"steps": 2, "best_eval": None})
    loaded = rundir.load(tmp_path / "w")
    assert loaded.config.model.name == "unet" and loaded.config.data.scale_range == (1.0, 1.0)
    assert loaded.config == config.from_dict(json.loads(run.config_file.read_text()))
    assert loaded.records == [{"step": 1, "split": "train", "loss": 0.5, "lr": pytest.approx(0.1)},
                              {"step": 2, "split": "val", "miou": None,
                               "iou_per_class": [0.5, None]}]
    assert loaded.summary == {"steps": 2, "best_eval": None}


def test_truncate_after_keeps_earlier_records_and_drops_the_redone_ones(tmp_path):
    log = rundir.MetricsLog(tmp_path / "m.jsonl")
    for step, split in ((2, "train"), (2, "val"), (4, "train"), (4, "test"), (6, "train")):
        log.append({"step": step, "split": split})
    log.truncate_after(4, redo_splits=("test",))
    assert [(r["step"], r["split"]) for r in log.read()] == [(2, "train"), (2, "val"),
                                                             (4, "train")]
    with pytest.raises(ValueError, match="split"):
        log.append({"step": 1, "split": "dev"})


def test_a_run_directory_belongs_to_one_config(tmp_path):
    run = rundir.RunDir(tmp_path / "w")
    cfg = unet.get_config()
    assert run.check_usable(cfg) == []  # nothing there yet
    run.write_config(cfg)
    assert run.check_usable(cfg) == []
    cfg.optimizer.lr, cfg.train.freeze = 0.5, ("inc",)
    with pytest.raises(errors.ConfigError, match=r"another config \(optimizer.lr 0.001 -> 0.5; "
                       r"train.freeze \[\] -> \[\"inc\"\]\): these change what the run "
                       r"computes"):
        run.check_usable(cfg)
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.ConfigError, match="is a file, not a folder"):
        rundir.RunDir(tmp_path / "file" / "w").check_usable()
    with pytest.raises(errors.ConfigError, match=r"is .*empty a run directory\?"):
        rundir.RunDir(tmp_path / "empty").config()


def test_resume_policy_lets_only_fields_that_leave_the_numbers_alone_change(tmp_path):
    run = rundir.RunDir(tmp_path / "w")
    cfg = unet.get_config()
    run.write_config(cfg)
    cfg.data.workers, cfg.data.prefetch, cfg.train.log_every = 4, 0, 7
    cfg.train.eval_every = cfg.train.checkpoint_every = 100
    cfg.train.num_pictures, cfg.train.tensorboard = 0, True
    why = " (plays no part in the numbers)"
    assert run.check_usable(cfg) == [c + why for c in (
        "data.prefetch 2 -> 0", "data.workers 0 -> 4", "train.checkpoint_every 250 -> 100",
        "train.eval_every 250 -> 100", "train.log_every 50 -> 7", "train.num_pictures 4 -> 0",
        "train.tensorboard false -> true")]
    for field, value in (("train.steps", 2000), ("seed", 1), ("data.crop_size", (32, 32)),
                         ("train.precision", "bf16"), ("train.best_metric", "loss"),
                         ("model.init_from", "runs/x"), ("train.eval_batch_size", 8)):
        changed = unet.get_config()
        config.set_field(changed, field, value)
        with pytest.raises(errors.ConfigError, match=rf"\({re.escape(field)} .* -> .*\): this "
                           "changes what the run computes, so it cannot resume with it"):
            run.check_usable(changed)
    # a field added to the code since the run was made is reported, not refused
    saved = json.loads(run.config_file.read_text())
    del saved["model"]["init_from"], saved["train"]["best_metric"]
    run.config_file.write_text(json.dumps(saved))
    assert run.check_usable(unet.get_config()) == [
        'model.init_from (absent) -> "" (a field the run\'s code did not have)',
        'train.best_metric (absent) -> "miou" (a field the run\'s code did not have)']


def test_checkpoints_keep_the_newest_and_skip_an_unreadable_one(tmp_path):
    run = rundir.RunDir(tmp_path)
    for step in (1, 2, 3):
        run.save_checkpoint(step, {"state": {"step": torch.tensor(step)}}, keep=2)
    assert [s for s, _ in run.checkpoint_files()] == [2, 3]
    newest = run.latest_checkpoint()
    newest.write_bytes(newest.read_bytes()[:20])
    with pytest.warns(UserWarning, match=f"checkpoint {newest} is unreadable"):
        assert int(run.restore_checkpoint()["state"]["step"]) == 2
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic writes leave no temporary file


def test_a_saved_config_comes_back_with_tuples_and_new_defaults():
    cfg = unet.get_config()
    saved = rundir.to_jsonable(cfg)
    del saved["eval"]["flip"], saved["train"]["tensorboard"]  # a run made before these existed
    back = config.from_dict(json.loads(json.dumps(saved)), defaults=common.get_base_config())
    assert back.eval.flip is False and back.train.tensorboard is False
    assert back.data.scale_range == (1.0, 1.0) and back.eval.window == (512, 512)
    assert config.diff(rundir.to_jsonable(back), rundir.to_jsonable(cfg)) == []


def test_dotted_fields_and_overrides():
    cfg = ml_collections.ConfigDict({"a": {"b": 1, "c": (1, 2)}, "d": "x"})
    assert config.flatten(cfg) == {"a.b": 1, "a.c": (1, 2), "d": "x"}
    assert config.unflatten(config.flatten(cfg)) == cfg.to_dict()
    config.set_field(cfg, "a.c", [3, 4])
    assert cfg.a.c == (3, 4)  # lists become tuples: ml_collections overrides need them
    with pytest.raises(errors.ConfigError, match=r"a\.e=1: no such field"):
        config.set_field(cfg, "a.e", 1)
    assert config.parse_override("a.b=false") == ("a.b", False)
    assert config.parse_override("d=resnet18") == ("d", "resnet18")
    assert config.diff({"a": {"b": 1}}, {"a": {"b": 2}, "e": 0}) == ["a.b", "e"]
