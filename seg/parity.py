"""Numbers of one implementation against another's, for seg/gpu_check.py's correctness
section (on whatever device it runs): the functional step against the nn.Module + torch.optim
loop, our optimizers against torch.optim's (foreach and fused), the compiled step against
itself over many steps (one graph, no recompilation), and the steps under CUDA's sync debug
mode (no host sync). Each check returns a dict with "passed" (None: not applicable here), its
numbers and the criterion it applied.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time

import ml_collections
import torch

from seg import amp, bench, functional, losses, models, optim, runtime
from seg import train as seg_train


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def _random_batches(n: int, batch: int, size: int, classes: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        masks = torch.randint(0, classes, (batch, size, size), generator=g)
        masks[:, :2] = 255   # an ignore band, as real data has
        out.append((torch.randn(batch, 3, size, size, generator=g).to(device), masks.to(device)))
    return out


def max_ulp(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    """The largest distance in float32 units in the last place over pairs of tensors."""
    worst = 0
    for x, y in zip(a, b):
        ix, iy = (t.detach().float().contiguous().view(torch.int32).long() for t in (x, y))
        ix = torch.where(ix < 0, -(ix & 0x7FFFFFFF), ix)   # sign-magnitude -> ordered integers
        iy = torch.where(iy < 0, -(iy & 0x7FFFFFFF), iy)
        worst = max(worst, int((ix - iy).abs().max()) if x.numel() else 0)
    return worst


def update_error(p0: list, ref: list, other: list) -> float:
    """|| (other - p0) - (ref - p0) || / || ref - p0 ||: how far an update moved from the
    reference update, relative to the update itself."""
    other, ref, p0 = ([t.detach() for t in ts] for ts in (other, ref, p0))
    num = sum(float(((o.double() - r.double()) ** 2).sum()) for o, r in zip(other, ref))
    den = sum(float(((r.double() - p.double()) ** 2).sum()) for r, p in zip(ref, p0))
    return math.sqrt(num / den) if den else math.inf


def step_parity(cfg, device: torch.device, size: int, batch: int, steps: int) -> dict:
    """seg.train's eager step against the same nn.Module trained with loss.backward() and
    torch.optim (foreach), from the same weights on the same batches, deterministic kernels."""
    classes = cfg.data.num_classes
    data = _random_batches(steps, batch, size, classes, device)
    loss_fn = losses.build(cfg.loss, classes)
    with runtime.deterministic_algorithms(True):
        model, params, buffers = functional.init(lambda: models.build(cfg.model, classes),
                                                 seed=0, device=device)
        optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, steps)
        step = seg_train.make_train_step(model, loss_fn, optimizer, schedule,
                                         trainable=list(params),
                                         aux_weight=cfg.loss.aux_weight)
        state = seg_train.init_state(params, buffers, optimizer, list(params))
        torch.manual_seed(123)   # dropout, CPU and CUDA generators
        ours = []
        for b in data:
            state, m = step(state, b)
            ours.append(m["loss"])
        module = models.build(cfg.model, classes)
        module.load_state_dict({**params, **buffers})
        module.to(device).train()
        opt = bench.torch_optimizer(cfg.optimizer, module.parameters())
        torch.manual_seed(123)
        theirs = []
        for images, masks in data:
            opt.zero_grad(set_to_none=True)
            loss = losses.total_loss(module(images), masks, loss_fn, cfg.loss.aux_weight)
            loss.backward()
            opt.step()
            theirs.append(loss.detach())
    names = list(params)
    ref = dict(module.named_parameters())
    ours_l, theirs_l = torch.stack(ours).double(), torch.stack(theirs).double()
    loss_rel = float(((ours_l - theirs_l).abs() / theirs_l.abs()).max())
    err = update_error([params[k] for k in names], [ref[k] for k in names],
                       [state.params[k] for k in names])
    return {"passed": err < 1e-3 and loss_rel < 1e-4, "steps": steps,
            "bitwise": max_ulp([state.params[k] for k in names], [ref[k] for k in names]) == 0,
            "params_max_ulp": max_ulp([state.params[k] for k in names],
                                      [ref[k] for k in names]),
            "update_error": err, "loss_max_rel_diff": loss_rel,
            "criterion": "update error < 1e-3 and losses within 1e-4: the same kernels run in "
                         "both loops, but atomics in bilinear upsampling's backward sum in any "
                         "order and TF32 convolutions round what differs at 2**-11"}


OPTIMIZERS = {   # name: config.optimizer fields
    "sgd_momentum": dict(name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=1e-4),
    "sgd_nesterov": dict(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2),
    "adamw": dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05),
}


def optimizer_parity(model_cfg, device: torch.device, steps: int) -> dict:
    """Each optimizer, ours (foreach and fused) against torch.optim (foreach and fused), on
    random gradients for a model's parameter shapes; and each one's time per update."""
    with torch.device("meta"):
        shapes = [p.shape for p in models.build(model_cfg, 21).parameters()]
    g = torch.Generator(device=device).manual_seed(0)
    p0 = [0.1 * torch.randn(s, device=device, generator=g) for s in shapes]
    grads = [[torch.randn(s, device=device, generator=g) for s in shapes] for _ in range(steps)]
    sched = ml_collections.ConfigDict(dict(name="constant"))
    result, passed = {"params": sum(p.numel() for p in p0)}, True
    for name, fields in OPTIMIZERS.items():
        finals, times = {}, {}
        for impl in ("foreach", "fused"):
            cfg = ml_collections.ConfigDict({**fields, "fused": impl == "fused"})
            ours, _ = optim.build(cfg, sched, steps)
            finals[f"ours_{impl}"], times[f"ours_{impl}"] = _run_ours(ours, p0, grads, device)
            finals[f"torch_{impl}"], times[f"torch_{impl}"] = _run_torch(
                cfg, p0, grads, device, fused=impl == "fused")
        row = {"ms_per_update": times}
        for impl in ("foreach", "fused"):
            a, b = finals[f"ours_{impl}"], finals[f"torch_{impl}"]
            row[f"{impl}_max_ulp"] = max_ulp(a, b)
            row[f"{impl}_update_error"] = update_error(p0, b, a)
        ok = row["fused_max_ulp"] == 0 and row["foreach_update_error"] < 1e-5
        row["passed"], passed = ok, passed and ok
        result[name] = row
    result["passed"] = passed
    result["criterion"] = ("fused: bit for bit torch.optim(fused=True) (the same kernels); "
                           "foreach: update error < 1e-5 (the same arithmetic, up to a few "
                           f"float32 roundings per step over {steps} steps)")
    return result


def _timed_updates(update, steps: int, device) -> list[float]:
    times = []
    for i in range(steps):
        bench.sync(device)
        t0 = time.perf_counter()
        update(i)
        bench.sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _run_ours(opt, p0, grads, device):
    names = [str(i) for i in range(len(p0))]
    params = {k: p.clone() for k, p in zip(names, p0)}
    state = opt.init(params)

    def update(i):
        nonlocal params, state
        g = {k: t.clone() for k, t in zip(names, grads[i])}   # donated: the step's own
        params, state = opt.update(g, state, params, donate=True)

    times = _timed_updates(update, len(grads), device)
    return [params[k] for k in names], 1e3 * statistics.median(times[1:] or times)


def _run_torch(cfg, p0, grads, device, fused: bool):
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = bench.torch_optimizer(cfg, params, fused=fused)

    def update(i):
        for p, g in zip(params, grads[i]):
            p.grad = g.clone()
        opt.step()

    times = _timed_updates(update, len(grads), device)
    return [p.detach() for p in params], 1e3 * statistics.median(times[1:] or times)


def _fast_step(cfg, device, precision: str, compile):
    classes = cfg.data.num_classes
    model, params, buffers = functional.init(lambda: models.build(cfg.model, classes), seed=0,
                                             device=device)
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 10 ** 6)
    scale = amp.LossScale() if precision == "fp16" else None
    step = seg_train.make_train_step(
        model, losses.build(cfg.loss, classes), optimizer, schedule, trainable=list(params),
        aux_weight=cfg.loss.aux_weight, grad_impl="func", compile=compile, donate=True,
        precision=precision, channels_last=True, loss_scale=scale)
    state = seg_train.init_state(params, buffers, optimizer, list(params), channels_last=True,
                                 loss_scale=scale)
    return step, state


def compile_check(cfg, device: torch.device, backend: str, precision: str, batch: int,
                  size: int, steps: int, keep: dict) -> dict:
    """The fast-path train step (precision, channels_last) under torch.compile(fullgraph=True,
    backend): how many graphs the backend is handed (1: no break, no recompilation) over
    `steps` steps, recompiling being an error after the first; its losses against the same
    step in eager mode. keep gets both steps ("fast_eager", "fast_compiled") for sync_check."""
    data = _random_batches(3, batch, size, cfg.data.num_classes, device)
    inner = torch._dynamo.lookup_backend(backend)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    losses_seen = {}
    for name, compile in (("eager", False), ("compiled", counting)):
        step, state = _fast_step(cfg, device, precision, compile)
        torch.manual_seed(123)
        seen, t0 = [], time.perf_counter()
        state, m = step(state, data[0])
        seen.append(m["loss"])
        bench.sync(device)
        first = time.perf_counter() - t0
        recompiled = None
        patch = (torch._dynamo.config.patch(error_on_recompile=True) if compile
                 else contextlib.nullcontext())
        try:
            with patch:
                for i in range(1, steps):
                    state, m = step(state, data[i % len(data)])
                    seen.append(m["loss"])
        except Exception as e:  # noqa: BLE001 - a recompilation is what this check looks for
            recompiled = _one_line(e)
        losses_seen[name] = torch.stack(seen).double()
        keep[f"fast_{name}"] = (step, state, data[0])
        if compile:
            first_call_s = first
    n = min(len(v) for v in losses_seen.values())
    rel = (losses_seen["compiled"][:n] - losses_seen["eager"][:n]).abs() / \
        losses_seen["eager"][:n].abs()
    return {"passed": len(graphs) == 1 and recompiled is None, "graphs": len(graphs),
            "graph_nodes": graphs, "recompiled": recompiled, "steps": len(losses_seen["compiled"]),
            "backend": backend, "precision": precision, "first_call_s": first_call_s,
            "loss_max_rel_diff_vs_eager": float(rel.max()),
            "criterion": "one graph for every step (fullgraph=True: a break is an error), none "
                         "recompiled"}


def sync_check(cfg, device: torch.device, batch: int, size: int, more: dict) -> dict:
    """torch.cuda.set_sync_debug_mode("error") around steps of `cfg`'s eager step in fp32 and
    fp16, and of the steps in `more` (name: (step, state, batch)): any operation that makes the
    host wait for the GPU (a .item(), a device-to-host copy, a nonzero) raises, naming itself."""
    if device.type != "cuda":
        return {"passed": None, "note": "CUDA only: on the CPU nothing waits for a device"}
    data = _random_batches(1, batch, size, cfg.data.num_classes, device)
    steps = dict(more)
    for precision in ("fp32", "fp16"):
        classes = cfg.data.num_classes
        model, params, buffers = functional.init(lambda: models.build(cfg.model, classes),
                                                 seed=0, device=device)
        optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 10 ** 6)
        scale = amp.LossScale() if precision == "fp16" else None
        step = seg_train.make_train_step(model, losses.build(cfg.loss, classes), optimizer,
                                         schedule, trainable=list(params),
                                         aux_weight=cfg.loss.aux_weight, donate=True,
                                         precision=precision, loss_scale=scale)
        state = seg_train.init_state(params, buffers, optimizer, list(params), loss_scale=scale)
        steps[f"eager_{precision}"] = (step, state, data[0])
    out, passed = {}, True
    for name, (step, state, batch) in steps.items():
        state, _ = step(state, batch)   # warm: first-call work (allocations, autotuning)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                state, _ = step(state, batch)
            out[name] = {"passed": True}
        except RuntimeError as e:
            out[name], passed = {"passed": False, "error": _one_line(e)}, False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
    return {"passed": passed, "steps": out}
