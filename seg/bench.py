"""Speed of train steps and of the input pipeline, measured one way for every tool that reports
it: experiments/benchmark.py, experiments/loader_bench.py and experiments/gpu_check.py.

Train steps (`time_modes`): every mode of one model starts from the same weights and sees the
same batch. Modes run round-robin, the order rotating each round, so machine drift hits all
alike; "x imperative" is the median over rounds of the paired per-round ratio, which cancels the
drift a ratio of medians would keep; on CPU the same ratio of process CPU time is kept too
(steadier where other jobs share the cores). Per mode: step time (median and interquartile
range over rounds), images/s, the first call's time (compilation for compiled modes), achieved
TFLOP/s (3 x the forward FLOPs of seg.models.forward_flops, the usual estimate of forward plus
backward) and, given a peak, the model FLOPs utilisation (MFU); peak memory: what the mode keeps
between steps plus the most a steady-state step adds (torch.cuda memory statistics on GPU; on
CPU the peak RSS of a fresh process per mode, Linux and glibc only, compiled modes left out).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import ml_collections
import torch
import torchvision

from seg import amp, data, functional, losses, models, optim, rundir, runtime
from seg import train as seg_train
from seg.data import augment, batches
from seg.models.backbones import from_torchvision_segmentation

# mode: make_train_step options; None marks the torch.optim loops.
MODES = {
    "imperative": None,      # the same nn.Module, loss.backward() and torch.optim (foreach)
    "torchvision": None,     # torchvision's own model in that loop
    "eager": {},             # seg.train.make_train_step, eager, state donated
    "compile": {"compile": True},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "channels_last": {"channels_last": True},
    "fast": {"compile": True, "precision": "bf16", "channels_last": True},
    "fast_fp16": {"compile": True, "precision": "fp16", "channels_last": True},   # no bf16
    "checkpoint": {"checkpoint_activations": True},
}
# (model.name, model.backbone) -> torchvision's definition of the same network (same names)
TORCHVISION = {("deeplabv3", "resnet50"): torchvision.models.segmentation.deeplabv3_resnet50,
               ("fcn_resnet", "resnet50"): torchvision.models.segmentation.fcn_resnet50,
               ("lraspp", "mobilenet_v3_large"):
                   torchvision.models.segmentation.lraspp_mobilenet_v3_large}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)   # long runs: show where they are


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """One model's config, device, batch and FLOP count at the benchmark's settings.

    cfg: an experiment config (model, loss, optimizer, train.freeze, data.num_classes)."""

    def __init__(self, cfg, device: torch.device, batch_size: int, image_size: int,
                 label: str = "", name: str = ""):
        self.cfg, self.device = cfg, device
        self.name, self.label = name or cfg.model.name, label or name or cfg.model.name
        self.batch_size, self.image_size = batch_size, image_size
        k = cfg.data.num_classes
        g = torch.Generator().manual_seed(0)
        self.batch = (torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
                      torch.randint(0, k, (batch_size, image_size, image_size),
                                    generator=g).to(device))
        self.loss_fn = losses.build(cfg.loss, k)
        self.train_gflop = 3 * batch_size * models.forward_flops(
            cfg.model, k, (image_size, image_size)) / 1e9

    def init(self):
        return functional.init(lambda: models.build(self.cfg.model, self.cfg.data.num_classes),
                               seed=0, device=self.device)

    def torchvision_model(self) -> Callable | None:
        return TORCHVISION.get((self.cfg.model.name, self.cfg.model.get("backbone")))

    def applies(self, mode: str) -> str | None:
        """Why `mode` does not apply to this model here, or None."""
        if mode == "torchvision" and self.torchvision_model() is None:
            return "no torchvision equivalent"
        if mode == "checkpoint":
            with torch.device("meta"):
                model = models.build(self.cfg.model, self.cfg.data.num_classes)
            if not any(isinstance(m, models.CHECKPOINT_BLOCKS) for m in model.modules()):
                return "no block to recompute"
        if (MODES[mode] or {}).get("precision") == "bf16" and self.device.type == "cuda" and \
                not torch.cuda.is_bf16_supported(including_emulation=False):
            return "no bf16 on this GPU"
        return None


def torch_optimizer(o, params, *, fused: bool = False):
    """torch.optim's optimizer for config.optimizer `o` (foreach, or its fused kernels)."""
    impl = {"fused": True} if fused else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, **impl)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
               **impl)


def functional_runner(s: Setup, options: dict, backend: str = "inductor"):
    """run(n) -> the last loss, for seg.train's step with make_train_step `options`."""
    model, params, buffers = s.init()
    cfg = s.cfg
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 10**6)
    trainable, _ = functional.split_trainable(params, cfg.train.freeze)
    if options.get("compile"):
        options = {**options, "compile": backend}
    scale = amp.LossScale() if options.get("precision") == "fp16" else None
    step = seg_train.make_train_step(model, s.loss_fn, optimizer, schedule, trainable=trainable,
                                     frozen_modules=cfg.train.freeze,
                                     aux_weight=cfg.loss.aux_weight, donate=True,
                                     loss_scale=scale, **options)
    state = seg_train.init_state(params, buffers, optimizer, trainable,
                                 channels_last=options.get("channels_last", False),
                                 loss_scale=scale)

    def run(n):
        nonlocal state
        for _ in range(n):
            state, m = step(state, s.batch)
        return m["loss"]
    return run


def imperative_runner(s: Setup, torchvision_model: bool = False):
    """run(n) -> the last loss, for the nn.Module (ours or torchvision's, our initial weights
    loaded: same names) trained with loss.backward() and torch.optim, frozen params excluded."""
    cfg = s.cfg
    _, params, buffers = s.init()
    state = {**params, **buffers}
    if torchvision_model:
        aux = {"aux_loss": cfg.model.aux} if "aux" in cfg.model else {}
        model = s.torchvision_model()(weights=None, weights_backbone=None,
                                      num_classes=cfg.data.num_classes, **aux)
        # its MobileNetV3 models name the encoder's modules without "features."
        theirs = list(model.state_dict())
        ours = from_torchvision_segmentation(dict.fromkeys(theirs), cfg.model.backbone)
        state = {their_name: state[our_name] for our_name, their_name in zip(ours, theirs)}
    else:
        model = models.build(cfg.model, cfg.data.num_classes)
    model.load_state_dict(state)  # strict
    model.to(s.device).train()
    _, frozen = functional.split_trainable(dict(model.named_parameters()), cfg.train.freeze)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    opt = torch_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    images, masks = s.batch

    def run(n):
        for _ in range(n):
            for prefix in cfg.train.freeze:  # as seg.functional.set_mode
                model.get_submodule(prefix).eval()
            opt.zero_grad(set_to_none=True)
            loss = losses.total_loss(model(images), masks, s.loss_fn, cfg.loss.aux_weight)
            loss.backward()
            opt.step()
        return loss.detach()
    return run


def runner(s: Setup, mode: str, backend: str = "inductor"):
    if MODES[mode] is None:
        return imperative_runner(s, torchvision_model=mode == "torchvision")
    return functional_runner(s, MODES[mode], backend)


def timed(run, n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of n steps."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    run(n)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------- peak memory


def cuda_step_peak(run, device: torch.device) -> int:
    """The most one step allocates above what was allocated before it."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run(1)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def cpu_peak(s: Setup, mode: str) -> int:
    """Peak RSS of one mode in this (fresh) process above the RSS before it was built. After a
    warm step glibc gives its free pages back (malloc_trim) and the kernel's high-water mark is
    reset (clear_refs 5), so a steady-state step's temporaries are faulted in and counted again
    while init's transients are not."""
    before = _proc_status_bytes("VmRSS")
    run = runner(s, mode)
    run(1)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    run(1)
    return _proc_status_bytes("VmHWM") - before


def _cpu_peak_child(cfg_dict: dict, label: str, batch: int, size: int, mode: str,
                    keep_freed_memory: bool, threads: int, out) -> None:
    torch.set_num_threads(threads)
    if keep_freed_memory:
        runtime.keep_freed_memory()
    try:
        s = Setup(ml_collections.ConfigDict(cfg_dict), torch.device("cpu"), batch, size, label)
        out.send(cpu_peak(s, mode))
    except Exception:  # noqa: BLE001 - reported as n/a: no /proc or glibc here
        out.send(None)


def cpu_peak_in_subprocess(s: Setup, mode: str, keep_freed_memory: bool = True) -> int | None:
    """cpu_peak in a fresh process (spawned: nothing of this one's heap in it); None when it
    cannot be measured here."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_cpu_peak_child, args=(
        s.cfg.to_dict(), s.label, s.batch_size, s.image_size, mode, keep_freed_memory,
        torch.get_num_threads(), send))
    proc.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:
        return None
    finally:
        proc.join()


# ---------------------------------------------------------------- timing


def time_modes(s: Setup, modes: list[str], *, rounds: int, steps: int, warmup: int = 2,
               backend: str = "inductor", memory: bool = True, peak_tflops: float | None = None,
               keep_freed_memory: bool = True) -> dict:
    """Times the modes of one model round-robin (see the module docstring)."""
    result = {"model": s.name, "label": s.label, "batch_size": s.batch_size,
              "image_size": s.image_size, "train_gflop_per_step": s.train_gflop, "modes": {},
              "skipped": {}}
    runners, first, resident = {}, {}, {}
    cuda_memory = memory and s.device.type == "cuda"
    for mode in modes:
        why = s.applies(mode)
        if why:
            result["skipped"][mode] = why
            continue
        before = torch.cuda.memory_allocated(s.device) if cuda_memory else 0
        runners[mode] = runner(s, mode, backend)
        first[mode] = timed(runners[mode], 1, s.device)[0]
        progress(f"{s.name} {mode}: first call {first[mode]:.1f} s")
        if warmup > 1:
            runners[mode](warmup - 1)
        if cuda_memory:  # built and warmed one after another: the difference is this mode's
            resident[mode] = torch.cuda.memory_allocated(s.device) - before
    times = {mode: [] for mode in runners}
    cpu_times = {mode: [] for mode in runners}
    order = list(runners)
    for r in range(rounds):
        k = r % len(order) if order else 0
        for mode in order[k:] + order[:k]:
            wall, cpu = timed(runners[mode], steps, s.device)
            times[mode].append(wall / steps)
            cpu_times[mode].append(cpu / steps)
        progress(f"{s.name}: round {r + 1} done")
    for mode, ts in times.items():
        m = result["modes"][mode] = summarise(s, ts, times.get("imperative"), first[mode],
                                              peak_tflops)
        if s.device.type == "cpu":
            cs = cpu_times[mode]
            m.update(cpu_s_median=statistics.median(cs), cpu_s_all=cs,
                     x_imperative_cpu=paired_ratio(cs, cpu_times.get("imperative")))
        if cuda_memory:
            m["peak_mem_bytes"] = resident[mode] + cuda_step_peak(runners[mode], s.device)
    del runners
    torch._dynamo.reset()  # compiled steps share one code object: keep its cache small
    if memory and s.device.type == "cpu":
        for mode in times:  # compiled modes would compile again per process: left out on CPU
            if not (MODES[mode] or {}).get("compile"):
                result["modes"][mode]["peak_mem_bytes"] = cpu_peak_in_subprocess(
                    s, mode, keep_freed_memory)
                progress(f"{s.name} {mode}: peak memory measured")
    return result


def paired_ratio(ts: list[float], base: list[float] | None) -> float | None:
    """Median over rounds of this round's time over the baseline's in the same round."""
    return statistics.median(t / b for t, b in zip(ts, base)) if base else None


def summarise(s: Setup, ts: list[float], base: list[float] | None, first: float,
              peak_tflops: float | None = None) -> dict:
    med = statistics.median(ts)
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else ts * 3
    out = {"step_s_median": med, "step_s_q1": q1, "step_s_q3": q3, "step_s_all": ts,
           "images_per_s": s.batch_size / med, "first_call_s": first,
           "tflops": s.train_gflop / med / 1e3, "x_imperative": paired_ratio(ts, base)}
    if peak_tflops:
        out["mfu"] = out["tflops"] / peak_tflops
    return out


def table_head(mfu: bool = False) -> str:
    head = ("| model | mode | step median (IQR) | images/s | x imperative | first call | "
            "peak mem | TFLOP/s |" + (" MFU |" if mfu else ""))
    return head + "\n|" + "---|" * (head.count("|") - 1)


def table_rows(r: dict, mfu: bool = False) -> str:
    rows = []
    for mode, m in r["modes"].items():
        mem, ratio, ratio_cpu = m.get("peak_mem_bytes"), m["x_imperative"], m.get(
            "x_imperative_cpu")
        rows.append(
            f"| {r['label']} | {mode} | {m['step_s_median'] * 1e3:.0f} ms "
            f"({m['step_s_q1'] * 1e3:.0f}-{m['step_s_q3'] * 1e3:.0f}) | "
            f"{m['images_per_s']:.2f} | {'' if ratio is None else f'{ratio:.3f}'}"
            f"{'' if ratio_cpu is None else f' (CPU time {ratio_cpu:.3f})'} | "
            f"{m['first_call_s']:.1f} s | "
            f"{'n/a' if mem is None else f'{mem / 2**20:.0f} MiB'} | {m['tflops']:.3f} |"
            + (f" {100 * m['mfu']:.1f}% |" if mfu and "mfu" in m else " |" if mfu else ""))
    for mode, why in r["skipped"].items():
        rows.append(f"| {r['label']} | {mode} | skipped: {why} |" + " |" * (5 + mfu))
    return "\n".join(rows)


def explain(s: Setup) -> dict:
    """torch._dynamo.explain over the step torch.compile would trace in the fast mode."""
    options = {k: v for k, v in MODES["fast"].items() if k != "compile"}
    model, params, buffers = s.init()
    optimizer, schedule = optim.build(s.cfg.optimizer, s.cfg.schedule, 10**6)
    trainable, _ = functional.split_trainable(params, s.cfg.train.freeze)
    step = seg_train.make_train_step(model, s.loss_fn, optimizer, schedule, trainable=trainable,
                                     frozen_modules=s.cfg.train.freeze,
                                     aux_weight=s.cfg.loss.aux_weight, grad_impl="func",
                                     **options)
    state = seg_train.init_state(params, buffers, optimizer, trainable,
                                 channels_last=options["channels_last"])
    e = torch._dynamo.explain(step)(state, s.batch)
    return {"model": s.name, "options": options, "graph_count": e.graph_count,
            "graph_break_count": e.graph_break_count, "op_count": e.op_count,
            "break_reasons": [str(b.reason) for b in e.break_reasons]}


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                  iters: int = 20, repeats: int = 5) -> float:
    """The best achieved TFLOP/s of an n x n x n matrix product in `dtype` on `device` (after a
    warm-up): the peak a model's FLOP rate is held against (its MFU), measured on the same
    machine in the same run instead of read from a datasheet."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
    return best


# ---------------------------------------------------------------- input pipeline


def loader_rates(data_cfg, batch_size: int, seed: int, workers: list[int], *, steps: int,
                 warmup: int, device: torch.device, prefetch: int = 2,
                 num_seeds: tuple[int, ...] = (1,)) -> list[dict]:
    """Images/s (and megapixels/s of the crops) of the train input pipeline alone: reading,
    decoding, augmenting, collating, the copy to `device` and normalising, with no model, for
    each number of DataLoader workers; `steps` batches timed after `warmup` untimed ones
    (worker start-up, page cache). num_seeds: for each K > 1, the batches of the K members of a
    train.num_seeds run (each its own order and augmentation: batches.member_batches), K x
    batch_size images a step."""
    dataset = data.build(data_cfg, "train")
    transform = augment.train_transform(data_cfg, dataset.info)
    rows = []
    for n in workers:
        for k in num_seeds:
            options = dict(device=device, workers=n, prefetch=prefetch)
            stream = (batches.train_batches(dataset, transform, batch_size, seed, **options)
                      if k == 1 else batches.member_batches(
                          dataset, transform, batch_size, [seed + s for s in range(k)],
                          **options))
            for _ in range(warmup):
                images, _ = next(stream)
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                images, _ = next(stream)
            sync(device)
            rate = steps * k * batch_size / (time.perf_counter() - start)
            rows.append({"workers": n, "num_seeds": k, "images_per_s": rate,
                         "seconds_per_step": k * batch_size / rate,
                         "megapixels_per_s": rate * images.shape[-2] * images.shape[-1] / 1e6,
                         "crop": list(images.shape[-2:])})
            del stream   # stops its workers before the next count starts its own
    return rows


# ---------------------------------------------------------------- whole runs (the scripts)


def run_models(setups, modes: list[str], *, rounds: int, steps: int, warmup: int = 2,
               backend: str = "inductor", memory: bool = True,
               peak_tflops: float | None = None, keep_freed_memory: bool = True,
               explain_only: bool = False, out: str | None = None) -> list[dict]:
    """Times (or, explain_only, explains) each Setup in turn; prints its table rows and rewrites
    `out` (JSON: results and environment) after each model. peak_tflops: None measures the bf16
    matrix product's on a GPU (MFU against it) and leaves MFU out on a CPU."""
    setups = list(setups)
    device = setups[0].device if setups else torch.device("cpu")
    if keep_freed_memory:
        runtime.keep_freed_memory()  # CPU steps re-allocate big tensors; see seg/runtime.py
    if peak_tflops is None and device.type == "cuda" and not explain_only:
        peak_tflops = matmul_tflops(device)
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "device": runtime.device_name(device), "keep_freed_memory": keep_freed_memory,
           "argv": sys.argv, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "peak_tflops": peak_tflops}
    results = []
    if not explain_only:
        print(table_head(mfu=peak_tflops is not None), flush=True)
    for s in setups:
        if explain_only:
            r = explain(s)
            print(f"{r['model']} {r['options']}: {r['graph_count']} graph(s), "
                  f"{r['graph_break_count']} break(s), {r['op_count']} ops "
                  f"{r['break_reasons'] or ''}", flush=True)
        else:
            with runtime.cudnn_autotuning(True):   # as training runs
                r = time_modes(s, modes, rounds=rounds, steps=steps, warmup=warmup,
                               backend=backend, memory=memory, peak_tflops=peak_tflops,
                               keep_freed_memory=keep_freed_memory)
            print(table_rows(r, mfu=peak_tflops is not None), flush=True)
        results.append(r)
        if out:
            rundir.write_json(out, {"results": results, "environment": env})
    return results


def run_loader(data_cfg, batch_size: int, seed: int, workers: list[int], *, steps: int,
               warmup: int, device: torch.device, prefetch: int = 2,
               num_seeds: tuple[int, ...] = (1,), out: str | None = None) -> list[dict]:
    """loader_rates, printed as a table and written to `out` (JSON)."""
    print(f"{data_cfg.name}: batch {batch_size}, {os.cpu_count()} CPUs, delivered to {device}\n"
          "| workers | members K | images/s | megapixels/s | seconds per step |\n"
          "|---|---|---|---|---|", flush=True)
    rows = loader_rates(data_cfg, batch_size, seed, workers, steps=steps, warmup=warmup,
                        device=device, prefetch=prefetch, num_seeds=num_seeds)
    for r in rows:
        print(f"| {r['workers']} | {r['num_seeds']} | {r['images_per_s']:.1f} | "
              f"{r['megapixels_per_s']:.1f} | {r['seconds_per_step']:.3f} |")
    if out:
        from seg import rundir
        rundir.write_json(out, {"data": data_cfg.to_dict(), "batch_size": batch_size,
                                "steps": steps, "warmup": warmup, "device": str(device),
                                "cpus": os.cpu_count(), "torch": torch.__version__,
                                "results": rows})
    return rows


def time_grad_reduce(cfg, *, batch_size: int, image_size: int, bucket_mb: float, rounds: int,
                     steps: int, out: str | None = None) -> dict | None:
    """Under torchrun: the eager train step of `cfg` with its gradients averaged over the ranks
    by one all-reduce after the backward, and by all-reduces of bucket_mb buckets overlapping
    the backward (seg.distributed.grad_reducer), timed round-robin as `time_modes` does (each
    rank on its own batch slice, barriers around each timing). Rank 0 prints, writes `out` and
    returns the result."""
    from seg import distributed

    info = distributed.world_info(os.environ)
    device = runtime.select_device("auto", info)
    with distributed.process_group(info, device) as group:
        s = Setup(cfg, device, batch_size, image_size)
        runners = {}
        for name, mb in (("after_backward", 0.0), ("overlapped", bucket_mb)):
            model, params, buffers = s.init()
            optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 10 ** 6)
            reduce = distributed.grad_reducer(group, mb)
            step = seg_train.make_train_step(model, s.loss_fn, optimizer, schedule,
                                             trainable=list(params), grad_reduce=reduce,
                                             aux_weight=cfg.loss.aux_weight, donate=True)
            runners[name] = [step, seg_train.init_state(params, buffers, optimizer,
                                                        list(params)), reduce]
        times = {name: [] for name in runners}
        for r in range(rounds + 1):   # round 0 warms up
            for name in (list(runners) if r % 2 else list(runners)[::-1]):
                step, state, _ = runners[name]
                torch.distributed.barrier(group)
                t0 = time.perf_counter()
                for _ in range(steps):
                    state, m = step(state, s.batch)
                float(m["loss"])
                torch.distributed.barrier(group)
                runners[name][1] = state
                if r:
                    times[name].append((time.perf_counter() - t0) / steps)
        if info.rank != 0:
            return None
        buckets = runners["overlapped"][2]
        result = {"model": cfg.model.to_dict(), "world_size": info.world_size,
                  "device": runtime.device_name(device), "batch_size": batch_size,
                  "image_size": image_size, "params": sum(p.numel() for p in s.init()[1].values()),
                  "bucket_mb": bucket_mb, "buckets": len(getattr(buckets, "buckets", [])),
                  # 0: too few buckets to overlap (seg.distributed.BucketedGradReduce)
                  "started_in_backward": getattr(buckets, "started_in_backward", 0),
                  "step_s": {k: statistics.median(v) for k, v in times.items()},
                  "step_s_all": times,
                  "overlapped_over_after": paired_ratio(times["overlapped"],
                                                        times["after_backward"])}
        print(f"{result['params'] / 1e6:.2f}M params, {result['buckets']} buckets of "
              f"{bucket_mb} MB ({result['started_in_backward']} started in the backward), "
              f"{info.world_size} ranks on {result['device']}: after the "
              f"backward {1e3 * result['step_s']['after_backward']:.0f} ms, overlapped "
              f"{1e3 * result['step_s']['overlapped']:.0f} ms per step (paired ratio "
              f"{result['overlapped_over_after']:.3f})", flush=True)
        if out:
            rundir.write_json(out, result)
        return result
