"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): measures
what the test asserts and rank 0 writes it to <out>/result.json.

  library:  a few train steps of a tiny UNet on rank slices of one global batch, with
            SyncBatchNorm2d (autograd and torch.func) or per-rank BN + average_buffers, against
            one process on the whole batch; the sharded evaluation against a single-process one.
  loop:     seg.loop.train_and_evaluate on 2 ranks; the final params / buffers / optimizer
            state each rank holds (captured by wrapping make_train_step / make_eval_step).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import ml_collections
import torch
import torch.distributed as dist

from configs import unet
from seg import distributed, functional, loop, losses, models, optim
from seg import train as seg_train
from seg.data import batches, synthetic

STEPS, GLOBAL_BATCH = 3, 4
MODEL = ml_collections.ConfigDict(dict(name="unet", base_channels=8, depth=2, bilinear=False,
                                       dropout=0.0))


def digest(*trees) -> str:
    h = hashlib.sha256()
    for tree in trees:
        for leaf in _leaves(tree):
            h.update(leaf.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _leaves(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k])
    else:
        yield tree


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def global_batches(data):
    """STEPS global batches; every pixel labelled (ignore -> background) so that each rank's
    mean loss has the same normaliser and the mean of the rank means is the global mean."""
    for step in range(STEPS):
        images = batches.normalize(data.images[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH],
                                   data.mean, data.std)
        masks = data.masks[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH].long()
        yield images, torch.where(masks == synthetic.IGNORE_INDEX, 0, masks)


def train(data, *, sync_bn: bool, world: bool, grad_impl: str = "autograd",
          bucket_mb: float = 0.0):
    """STEPS steps of SGD with momentum; on this rank's slice when `world`, else the whole
    batch. bucket_mb > 0: the gradients' all-reduce overlaps the backward in such buckets."""
    model, params, buffers = functional.init(lambda: models.build(MODEL, 3), seed=0)
    if sync_bn:
        distributed.convert_sync_batchnorm(model)
    optimizer = optim.sgd(0.05, momentum=0.9)
    reduce = distributed.grad_reducer(bucket_mb=bucket_mb) if world else None
    step = seg_train.make_train_step(
        model, losses.cross_entropy, optimizer, optim.constant(0.05), trainable=list(params),
        grad_impl=grad_impl, grad_reduce=reduce)
    state = seg_train.init_state(params, buffers, optimizer, list(params))
    rank, size = dist.get_rank(), dist.get_world_size()
    losses_seen = []
    for images, masks in global_batches(data):
        if world:
            mine = slice(rank * GLOBAL_BATCH // size, (rank + 1) * GLOBAL_BATCH // size)
            images, masks = images[mine], masks[mine]
        state, m = step(state, (images, masks))
        losses_seen.append(m["loss"].item())
    if bucket_mb:   # how many all-reduces the last step started before its backward ended
        losses_seen.append(reduce.started_in_backward)
    return state, losses_seen


def library_checks(result: dict) -> None:
    data = synthetic.generate("train", STEPS * GLOBAL_BATCH, 32, num_classes=3, seed=0)
    rank = dist.get_rank()
    synced, synced_losses = train(data, sync_bn=True, world=True)
    synced_func, _ = train(data, sync_bn=True, world=True, grad_impl="func")
    # torch.func cannot hook the backward: the bucketed reducer falls back to its flat form
    func_buckets, _ = train(data, sync_bn=True, world=True, grad_impl="func", bucket_mb=0.004)
    local, local_losses = train(data, sync_bn=False, world=True)
    # 4 KB buckets: the tiny UNet's gradients go out in many all-reduces during the backward
    overlapped, overlapped_losses = train(data, sync_bn=False, world=True, bucket_mb=0.004)
    averaged = distributed.average_buffers(local.buffers)
    gathered = distributed.gather_objects({
        "synced": digest(synced.params, synced.buffers, synced.opt_state),
        "local_params": digest(local.params, local.opt_state),
        "local_buffers": digest(local.buffers), "averaged": digest(averaged),
        "overlapped": digest(overlapped.params, overlapped.buffers, overlapped.opt_state),
        "local_all": digest(local.params, local.buffers, local.opt_state),
        "running_mean": local.buffers["inc.1.running_mean"]})
    g = torch.Generator().manual_seed(0)  # a few steps predict one class: shake the weights
    shaken = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in synced.params.items()}
    evaluated = sharded_eval(shaken, synced.buffers, data)
    if rank != 0:
        return
    single, single_losses = train(data, sync_bn=False, world=False)
    mean_of_ranks = (gathered[0]["running_mean"] + gathered[1]["running_mean"]) / 2
    result.update({
        "synced_identical": gathered[0]["synced"] == gathered[1]["synced"],
        "local_params_identical": gathered[0]["local_params"] == gathered[1]["local_params"],
        "local_buffers_identical": gathered[0]["local_buffers"] == gathered[1]["local_buffers"],
        "averaged_identical": gathered[0]["averaged"] == gathered[1]["averaged"],
        # the same sums divided by the same world size: bit for bit the flat all-reduce's
        "overlapped_equals_flat": all(g["overlapped"] == g["local_all"] for g in gathered),
        "overlapped_losses_equal": overlapped_losses[:-1] == local_losses,
        "func_buckets_equal_flat": max_diff(func_buckets.params, synced_func.params) == 0,
        "started_in_backward": overlapped_losses[-1],
        "overlap_buckets": len(distributed.BucketedGradReduce(bucket_mb=0.004)._bucket(
            dict(synced.params))),
        "averaged_is_the_mean": torch.allclose(averaged["inc.1.running_mean"], mean_of_ranks,
                                               rtol=0, atol=1e-7),
        "sync_vs_single_params": max_diff(synced.params, single.params),
        "sync_vs_single_buffers": max_diff(synced.buffers, single.buffers),
        "sync_func_vs_autograd": max_diff(synced_func.params, synced.params),
        "local_vs_single_buffers": max_diff(local.buffers, single.buffers),
        "params_moved": max_diff(synced.params, functional.init(
            lambda: models.build(MODEL, 3), seed=0)[1]),
        "losses": [synced_losses, single_losses],
        "eval": evaluated,
        "eval_single": single_eval(shaken, synced.buffers, data)})


def _eval_step():
    model = functional.init(lambda: models.build(MODEL, 3), seed=0)[0]
    return seg_train.make_eval_step(model, losses.cross_entropy, 3)


def sharded_eval(params, buffers, data) -> dict:
    # 12 images: 6 per rank, in batches of 5 and 1
    shard = batches.eval_batches(data, None, 5, rank=dist.get_rank(),
                                 world_size=dist.get_world_size())
    out = seg_train.evaluate(_eval_step(), params, buffers, shard,
                             reduce=distributed.sum_across)
    return {k: out[k] for k in ("confusion_matrix", "miou", "loss")}


def single_eval(params, buffers, data) -> dict:
    out = seg_train.evaluate(_eval_step(), params, buffers, batches.eval_batches(data, None, 5))
    return {k: out[k] for k in ("confusion_matrix", "miou", "loss")}


def loop_run(workdir: Path, sync_bn: bool) -> dict:
    """seg.loop.train_and_evaluate on this rank; digests of the final state it holds."""
    seen = {}
    make_train_step, make_eval_step = seg_train.make_train_step, seg_train.make_eval_step

    def capture_train(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def wrapped(state, batch):
            new_state, m = step(state, batch)
            seen["opt_state"] = new_state.opt_state
            return new_state, m
        return wrapped

    class CaptureEval:
        def __init__(self, *args, **kwargs):
            self.step = make_eval_step(*args, **kwargs)
            self.scores = self.step.scores

        def __call__(self, params, buffers, batch):
            seen["params"], seen["buffers"] = params, buffers
            return self.step(params, buffers, batch)

    seg_train.make_train_step, seg_train.make_eval_step = capture_train, CaptureEval
    try:
        cfg = unet.get_config()
        cfg.model.base_channels, cfg.model.depth = 4, 2
        cfg.data.update(image_size=32, num_train=16, num_val=8, num_test=8)
        cfg.train.update(steps=4, batch_size=4, eval_every=2, log_every=2, checkpoint_every=2,
                         eval_batch_size=8, sync_bn=sync_bn,
                         grad_bucket_mb=25.0 if sync_bn else 0.002)   # local BN: overlapped
        loop.train_and_evaluate(cfg, workdir)
    finally:
        seg_train.make_train_step, seg_train.make_eval_step = make_train_step, make_eval_step
    # the last eval step saw the final params and buffers (after any averaging)
    return {"params": digest(seen["params"]), "buffers": digest(seen["buffers"]),
            "opt_state": digest(seen["opt_state"])}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {}
    library_checks(result)
    for name, sync_bn in (("run_local_bn", False), ("run_sync_bn", True)):
        digests = distributed.gather_objects(loop_run(out / name, sync_bn))
        result[name] = {k: digests[0][k] == digests[1][k] for k in digests[0]}
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
