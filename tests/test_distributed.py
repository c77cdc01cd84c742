"""Data parallel: rank sharding of the data, SyncBatchNorm2d's numbers, and two ranks under
torchrun (gloo) against one process (tests/dist_driver.py does the measuring)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
import torch
import torch.distributed as dist
from torch import nn

from seg import distributed, functional, losses, models, optim, rundir
from seg import train as seg_train
from seg.data import batches, synthetic

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return synthetic.generate("train", 12, 32, num_classes=3, seed=0)


# ---------------------------------------------------------------- world info and sharding

def test_only_batchnorm_statistics_are_averaged(monkeypatch):
    averaged = []

    def mean_across(tensors, group=None):
        averaged.extend(tensors)
        return [t + 1 for t in tensors]

    monkeypatch.setattr(distributed, "mean_across", mean_across)
    buffers = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2),
               "bn.num_batches_tracked": torch.tensor(3),
               "attn.relative_coords_table": torch.rand(1, 3, 3, 2),
               "attn.relative_position_index": torch.arange(4)}
    out = distributed.average_buffers(buffers)
    assert [id(t) for t in averaged] == [id(buffers["bn.running_mean"]),
                                         id(buffers["bn.running_var"])]
    assert torch.equal(out["bn.running_var"], torch.full((2,), 2.0))
    for k in ("bn.num_batches_tracked", "attn.relative_coords_table",
              "attn.relative_position_index"):
        assert out[k] is buffers[k]


def test_world_info_reads_torchrun_variables():
    assert distributed.world_info({}) == (0, 1, 0)
    assert distributed.world_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4"):
        distributed.world_info({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="integers"):
        distributed.world_info({"WORLD_SIZE": "two"})


def test_eval_needs_an_image_per_rank(data):
    with pytest.raises(ValueError, match="12 images cannot give each of 13 ranks one"):
        next(batches.eval_batches(data, None, 5, world_size=13, rank=0))


# ---------------------------------------------------------------- SyncBatchNorm2d, one rank

@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo group of one process: the collectives are identities, the arithmetic is real."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_equals_batchnorm(one_rank_group, momentum):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=momentum)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-0.5, 0.5)
    ref.running_mean.uniform_(-1, 1)   # the shift of the sums: any value gives the same numbers
    sync = distributed.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, momentum=momentum)))
    assert type(sync[0]) is distributed.SyncBatchNorm2d
    sync[0].load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 6) * 3 + 7  # far from zero mean: E[x^2] - E[x]^2 must not cancel
    g = torch.randn(3, 4, 5, 6)
    for _ in range(2):
        outs = []
        for module in (ref, sync[0]):
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            grads = torch.autograd.grad((y * g).sum(), [xi, module.weight, module.bias])
            outs.append((y, *grads))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(getattr(sync[0], name), buf, rtol=1e-6, atol=1e-6)
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x), ref(x))


def test_sync_batchnorm_train_step_under_torch_func_equals_plain_bn(one_rank_group):
    cfg = ml_collections.ConfigDict(dict(name="unet", base_channels=8, depth=2, bilinear=False,
                                         dropout=0.0))
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    results = []
    for sync in (False, True):
        model, params, buffers = functional.init(lambda: models.build(cfg, 3), seed=0)
        if sync:
            distributed.convert_sync_batchnorm(model)
        opt = optim.sgd(0.1, momentum=0.9)
        step = seg_train.make_train_step(model, losses.cross_entropy, opt, optim.constant(0.1),
                                         trainable=list(params), grad_impl="func",
                                         grad_reduce=distributed.make_grad_reduce())
        state = seg_train.init_state(params, buffers, opt, list(params))
        for _ in range(2):
            state, _ = step(state, batch)
        results.append(state)
    for a, b in ((results[0].params, results[1].params), (results[0].buffers, results[1].buffers)):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- two ranks under torchrun

@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tests/dist_driver.py", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out, json.loads((out / "result.json").read_text()), proc.stdout


def test_ranks_hold_identical_states(torchrun):
    _, r, _ = torchrun
    assert r["synced_identical"] and r["local_params_identical"]
    # per-rank BN statistics drift apart until averaged
    assert not r["local_buffers_identical"] and r["averaged_identical"]
    assert r["averaged_is_the_mean"]
    # the all-reduce overlapped with the backward, in many buckets, gives the flat one's numbers
    assert r["overlap_buckets"] > 2 and r["started_in_backward"] == r["overlap_buckets"]
    assert r["overlapped_equals_flat"] and r["overlapped_losses_equal"]
    assert r["func_buckets_equal_flat"]
    for run in ("run_local_bn", "run_sync_bn"):  # the training loop's final state
        assert r[run] == {"params": True, "buffers": True, "opt_state": True}


def test_sync_bn_on_two_ranks_equals_one_process_on_the_global_batch(torchrun):
    _, r, _ = torchrun
    assert r["params_moved"] > 1e-2  # the comparison below is not between untrained models
    assert r["sync_vs_single_params"] < 1e-5 and r["sync_vs_single_buffers"] < 1e-5
    assert r["sync_func_vs_autograd"] < 1e-6
    assert r["local_vs_single_buffers"] > 1e-3  # unsynchronised BN sees half batches
    torch.testing.assert_close(*map(torch.tensor, r["losses"]), rtol=1e-6, atol=0)


def test_sharded_eval_equals_single_process_eval(torchrun):
    _, r, _ = torchrun
    sharded, single = r["eval"], r["eval_single"]
    assert sharded["confusion_matrix"] == single["confusion_matrix"]
    assert sum(map(sum, single["confusion_matrix"])) > 0
    assert len({c for row in single["confusion_matrix"] for c in row}) > 3  # not one class
    assert sharded["miou"] == single["miou"]


def test_only_rank_zero_writes_and_prints(torchrun):
    out, _, stdout = torchrun
    for name in ("run_local_bn", "run_sync_bn"):
        workdir = out / name
        assert sorted(p.name for p in workdir.iterdir()) == [
            "checkpoints", "config.json", "inference.json", "metrics.jsonl", "per_image",
            "predictions", "summary.json"]
        # each rank evaluated its share; rank 0 wrote every image's counts, in order
        per_image = rundir.load_per_image(workdir / "per_image" / "val.npz")
        assert list(per_image.index) == list(range(8)) and per_image.step == 4
        assert sorted(p.name for p in (workdir / "predictions").iterdir()) == [
            "step_00000002.png", "step_00000004.png"]
        best = json.loads((workdir / "summary.json").read_text())["best_eval"]["step"]
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
            f"best_{best:08d}.pt", "ckpt_00000002.pt", "ckpt_00000004.pt"]
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [(r["step"], r["split"]) for r in records] == [
            (2, "train"), (2, "val"), (4, "train"), (4, "val"), (4, "test")]
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["environment"]["world_size"] == 2
        assert stdout.count(f"-> {workdir}") == 1
    assert stdout.count("step 4/4") == 2  # one line per run, not one per rank


def test_script_val_metrics_equal_a_single_process_eval_of_its_checkpoint(torchrun):
    out, _, _ = torchrun
    workdir = out / "run_local_bn"
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    saved = rundir.RunDir(workdir).restore_checkpoint()
    assert int(saved["state"]["step"]) == 4 and len(saved["rng"]) == 2  # every rank's RNG state
    model = functional.init(lambda: models.build(cfg.model, 3), seed=0)[0]
    eval_step = seg_train.make_eval_step(model, losses.cross_entropy, 3)
    val = synthetic.generate("val", 8, 32, num_classes=3, seed=0)
    state = saved["state"]
    result = seg_train.evaluate(eval_step, state["params"], state["buffers"],
                                batches.eval_batches(val, None, 8))
    record = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if '"val"' in line][-1]
    assert record["confusion_matrix"] == result["confusion_matrix"]
    assert record["miou"] == pytest.approx(result["miou"], abs=1e-12)
