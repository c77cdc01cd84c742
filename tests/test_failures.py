"""Clean failure: bad inputs stop before any work with one line naming the field and leave an
existing run untouched; a non-finite loss stops the run naming the step (keeping the last good
checkpoint) or, with train.nonfinite='skip', leaves the state as it was."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
import ml_collections
import pytest
import torch

from configs import unet
from seg import errors, functional, loop, losses, models, optim
from seg import train as seg_train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    c = unet.get_config()
    c.model.base_channels, c.model.depth = 4, 2
    c.data.update(image_size=32, num_train=16, num_val=8, num_test=8)
    c.train.update(steps=4, batch_size=4, eval_every=2, log_every=2, checkpoint_every=2,
                   eval_batch_size=8)
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def snapshot(workdir: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(workdir.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "w"
    loop.train_and_evaluate(tiny(), workdir)
    return workdir


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, env, field", [
    ({"data.num_classes": 6}, {}, "data.num_classes"),          # synthetic has 5 classes
    ({"data.crop_size": (48, 48)}, {}, "data.crop_size"),        # 32-pixel images
    ({"model.name": "segformer"}, {}, "model.name"),
    ({"data.name": "mapillary"}, {}, "data.name"),
    ({"train.batch_size": 6}, {"RANK": "0", "WORLD_SIZE": "4"}, "train.batch_size"),
    ({"train.nonfinite": "ignore"}, {}, "train.nonfinite"),
    ({"train.eval_batch_size": 6}, {"RANK": "0", "WORLD_SIZE": "4"}, "train.eval_batch_size"),
    ({"train.device": "tpu"}, {}, "train.device"),
    ({"model.bins": (1, 0)}, {}, "bins"),
    ({"optimizer.name": "lamb"}, {}, "optimizer.name"),
])
def test_bad_input_is_one_error_naming_the_field_and_touches_nothing(
        finished, monkeypatch, overrides, env, field):
    """What the command line reports as one line (seg/cli.py): a seg.errors.Error whose message
    is one line naming the field, raised before anything of the existing run changes."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = snapshot(finished)
    with pytest.raises(errors.Error) as e:
        loop.train_and_evaluate(tiny(**overrides), finished)
    message = str(e.value)
    assert "\n" not in message and field in message, message
    assert snapshot(finished) == before


# ---------------------------------------------------------------- non-finite loss: the step

def _step_and_state(skip: bool):
    cfg = ml_collections.ConfigDict(dict(name="unet", base_channels=4, depth=2, bilinear=False,
                                         dropout=0.0))
    model, params, buffers = functional.init(lambda: models.build(cfg, 3), seed=0)
    opt = optim.adam(1e-2)
    step = seg_train.make_train_step(model, losses.cross_entropy, opt, optim.constant(1e-2),
                                     trainable=list(params), donate=True, skip_nonfinite=skip)
    state = seg_train.init_state(params, buffers, opt, list(params))
    batch = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(1)))
    return step, step(state, batch)[0], batch  # one good step: momenta are not zero


def _assert_trees_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_trees_equal(a[k], b[k])
    elif a is None:   # the loss scale of a run that is not fp16
        assert b is None
    else:
        assert torch.equal(a, b)


def test_skip_mode_leaves_the_state_unchanged_for_a_nonfinite_step():
    step, state, (images, masks) = _step_and_state(skip=True)
    before = copy.deepcopy(state)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    after, m = step(state, (bad, masks))
    assert not m["finite"] and torch.isnan(m["loss"])
    assert int(after.step) == int(before.step) + 1  # the data position moves on
    _assert_trees_equal(after.params, before.params)
    _assert_trees_equal(after.buffers, before.buffers)
    _assert_trees_equal(after.opt_state, before.opt_state)
    _assert_trees_equal(state._asdict(), before._asdict())  # donate was turned off


def test_skip_mode_applies_a_finite_step_exactly():
    step, state, batch = _step_and_state(skip=True)
    plain, plain_state, _ = _step_and_state(skip=False)
    new, m = step(state, batch)
    ref, m_ref = plain(plain_state, batch)
    assert m["finite"] and m_ref["finite"]
    _assert_trees_equal(new._asdict(), ref._asdict())
    assert not torch.equal(new.params["outc.weight"], state.params["outc.weight"])


# ---------------------------------------------------------------- non-finite loss: the run

# Plain SGD at lr 1e8 on the tiny UNet: the loss is finite at steps 1-2 and NaN from step 3 on
# (while the parameters are still finite). The tests read the step from the run, not from here.
HUGE_LR = {"optimizer.name": "sgd", "optimizer.lr": 1e8, "train.steps": 8, "train.log_every": 1}


def test_stop_mode_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    cfg = tiny(**HUGE_LR, **{"train.eval_every": 4, "train.checkpoint_every": 2})
    with pytest.raises(errors.NonFiniteError) as e:
        loop.train_and_evaluate(cfg, workdir)
    match = re.fullmatch(r"non-finite loss at step (\d+) \(train.nonfinite='stop'\); "
                         r"the last good checkpoint is (\S+)", str(e.value))
    assert match, str(e.value)
    bad, kept = int(match.group(1)), Path(match.group(2))
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    # logged every step: finite up to the step before, nothing from the bad step on
    assert [r["step"] for r in train] == list(range(1, bad))
    assert all(r["loss"] is not None for r in train)
    saved = sorted((workdir / "checkpoints").iterdir())
    assert saved and saved[-1] == kept and int(kept.stem.split("_")[1]) < bad
    for path in saved:
        state = torch.load(path, weights_only=True)["state"]
        assert all(torch.isfinite(v).all() for v in state["params"].values()), path


def test_skip_mode_logs_skipped_steps_and_leaves_the_state_as_it_was(tmp_path):
    workdir = tmp_path / "w"
    loop.train_and_evaluate(tiny(**HUGE_LR, **{"train.checkpoint_every": 1, "train.keep_checkpoints": 10,
                                        "train.nonfinite": "skip"}), workdir)
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert [r["step"] for r in train] == list(range(1, 9))
    skipped = {r["step"] for r in train if r["skipped"]}
    assert skipped and 1 not in skipped
    assert all((r["loss"] is None) == (r["step"] in skipped) for r in train)

    def state(step):
        saved = torch.load(workdir / "checkpoints" / f"ckpt_{step:08d}.pt", weights_only=True)
        return saved["state"]

    for step in range(2, 9):
        before, after = state(step - 1), state(step)
        assert int(after["step"]) == step
        same = all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
        assert same == (step in skipped), step
        if step in skipped:
            _assert_trees_equal(after["buffers"], before["buffers"])
            _assert_trees_equal(after["opt_state"], before["opt_state"])
