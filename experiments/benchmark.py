"""Train-step speed of every model, every way of running it, side by side in one process.

  python experiments/benchmark.py --out=cpu.json          # CPU: batch 2 at 128x128
  python experiments/benchmark.py --out=gpu.json          # GPU: batch 16 at 512x512
  python experiments/benchmark.py --models=unet,pspnet --modes=eager,imperative,fast
  python experiments/benchmark.py --explain --models=unet,pspnet --image_size=64

Modes (each skipped where it does not apply):
  imperative     the baseline: the same nn.Module (loaded from our initial params) trained with
                 loss.backward() and torch.optim (foreach), frozen params excluded;
  torchvision    torchvision's fcn_resnet50 / deeplabv3_resnet50 (weights=None, our params
                 loaded: same names) in that same loop;
  eager          seg.train.make_train_step, eager, state donated (as experiments/train.py);
  compile        the same step under torch.compile (--compile_backend, fullgraph);
  bf16           bf16 autocast forward, fp32 weights and loss;
  channels_last  channels_last images and conv weights;
  fast           compile + bf16 + channels_last;
  checkpoint     eager with activation checkpointing of the ResNet / UNet blocks.
All start from the same weights and see the same batch. Modes run round-robin, the order
rotating each round, so machine drift hits all alike; "x imperative" is the median over rounds
of the paired per-round ratio, which cancels the drift a ratio of medians would keep; on CPU
the same ratio of process CPU time is shown too (steadier where other jobs share the cores;
OMP_WAIT_POLICY=passive keeps idle OpenMP threads from spinning into it).

Reported per mode: step time (median and interquartile range over rounds), images/s, the first
call's time (torch.compile's compile time for compiled modes), achieved TFLOP/s (3 x the forward
FLOPs of experiments/model_table.py's counter; % of --peak_tflops* on GPU), and peak memory: what
the mode keeps between steps plus the most a steady-state step adds (torch.cuda memory stats on
GPU; on CPU the peak RSS of a fresh process per mode above its RSS before the mode was built,
Linux and glibc only, compiled modes left out; else n/a).
--explain instead runs torch._dynamo.explain over the fast step and prints graphs and breaks.

--vmap_seeds=2,4,8 instead times train.num_seeds (seg/seeds_bench.py): one vmapped step of K
members against K separate steps, for UNet (base 16) and PSPNet-R18 at CamVid's half-resolution
crop (176x240, 11 classes), in the --vmap_modes given (eager, bf16, channels_last, compile, fast):

  python experiments/benchmark.py --vmap_seeds=2,4,8 --out=seeds_cpu.json
  python experiments/benchmark.py --vmap_seeds=2,4,8 --vmap_modes=eager,bf16 --out=seeds_gpu.json
"""
from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


import torch
import torchvision
from absl import app, flags

from configs import deeplabv3, fcn8s, fcn_resnet50, pspnet, unet
from seg import runtime
from seg import functional, losses, models, optim, rundir, seeds_bench
from seg import train as seg_train

# name: (label, config module, model overrides)
MODELS = {
    "fcn8s": ("FCN-8s, VGG-16", fcn8s, {}),
    "unet": ("UNet", unet, {}),
    "pspnet": ("PSPNet-R50", pspnet, {"backbone": "resnet50"}),
    "deeplabv3": ("DeepLabV3-R50", deeplabv3, {"backbone": "resnet50"}),
    "fcn_resnet50": ("FCN-R50", fcn_resnet50, {}),
}
TORCHVISION = {"deeplabv3": torchvision.models.segmentation.deeplabv3_resnet50,
               "fcn_resnet50": torchvision.models.segmentation.fcn_resnet50}
# name: make_train_step options; None marks the torch.optim loops.
MODES = {
    "imperative": None,
    "torchvision": None,
    "eager": {},
    "compile": {"compile": True},
    "bf16": {"precision": "bf16"},
    "channels_last": {"channels_last": True},
    "fast": {"compile": True, "precision": "bf16", "channels_last": True},
    "checkpoint": {"checkpoint_activations": True},
}

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Models to time, of {list(MODELS)}.")
_MODES = flags.DEFINE_list("modes", list(MODES), f"Modes to time, of {list(MODES)}.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch size (default: 16 on GPU, 2 on CPU).")
_SIZE = flags.DEFINE_integer("image_size", None, "Square input size (512 on GPU, 128 on CPU).")
_CLASSES = flags.DEFINE_integer("num_classes", 21, "Output classes (21: PASCAL VOC).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per round and mode (5 GPU, 1 CPU).")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Round-robin rounds (10 GPU, 5 CPU).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per mode, the first call included.")
_BACKEND = flags.DEFINE_string("compile_backend", "inductor", "torch.compile backend.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "GPU dense bf16 peak (H200: 989).")
_PEAK32 = flags.DEFINE_float("peak_tflops_fp32", 67.0, "GPU fp32 peak (H200: 67; cuDNN runs "
                             "fp32 convs as TF32 by default, so fp32 modes can exceed it).")
_MEMORY = flags.DEFINE_bool("memory", True, "Measure peak memory (CPU: one process per mode).")
_EXPLAIN = flags.DEFINE_bool("explain", False, "Run torch._dynamo.explain instead of timing.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")
_KEEP = flags.DEFINE_bool("keep_freed_memory", True, "seg.runtime.keep_freed_memory (glibc).")
_VMAP_SEEDS = flags.DEFINE_list("vmap_seeds", [], "Numbers of members K: time train.num_seeds "
                                 "(one vmapped step of K against K steps) instead of the modes.")
_VMAP_MODELS = flags.DEFINE_list("vmap_models", ["unet", "pspnet"], "--vmap_seeds: of "
                                 "unet (base 16), pspnet (ResNet-18).")
_VMAP_MODES = flags.DEFINE_list("vmap_modes", ["eager"], "--vmap_seeds: of eager, bf16, "
                                "channels_last, compile, fast.")
_VMAP_CROP = flags.DEFINE_list("vmap_crop", ["176", "240"], "--vmap_seeds: image H,W (CamVid "
                               "at half resolution).")
_PROBE = flags.DEFINE_string("probe_memory", None, "Internal: measure one mode's CPU memory.")


class Setup:
    """One model's config, device, batch and FLOP count at the benchmark's settings."""

    def __init__(self, name: str, device: torch.device, batch: int, size: int):
        label, module, overrides = MODELS[name]
        cfg = module.get_config()
        cfg.model.update(overrides)
        cfg.data.num_classes = _CLASSES.value
        cfg.schedule.name = "constant"  # torch.optim's loop has no scheduler here
        self.name, self.label, self.cfg, self.device = name, label, cfg, device
        self.batch_size, self.image_size = batch, size
        g = torch.Generator().manual_seed(0)
        self.batch = (torch.randn(batch, 3, size, size, generator=g).to(device),
                      torch.randint(0, cfg.data.num_classes, (batch, size, size),
                                    generator=g).to(device))
        self.loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
        self.train_gflop = 3 * batch * models.forward_flops(cfg.model, cfg.data.num_classes,
                                                            (size, size)) / 1e9

    def init(self):
        return functional.init(lambda: models.build(self.cfg.model, self.cfg.data.num_classes),
                               seed=0, device=self.device)

    def has_blocks(self) -> bool:
        with torch.device("meta"):
            model = models.build(self.cfg.model, self.cfg.data.num_classes)
        return any(isinstance(m, models.CHECKPOINT_BLOCKS) for m in model.modules())

    def applies(self, mode: str) -> str | None:
        """Why `mode` does not apply to this model, or None."""
        if mode == "torchvision" and self.name not in TORCHVISION:
            return "no torchvision equivalent"
        if mode == "checkpoint" and not self.has_blocks():
            return "no ResNet or UNet block"
        if (MODES[mode] or {}).get("precision") == "bf16" and self.device.type == "cuda" and \
                not torch.cuda.is_bf16_supported(including_emulation=False):
            return "no bf16 on this GPU"
        return None


def functional_runner(s: Setup, options: dict):
    model, params, buffers = s.init()
    cfg = s.cfg
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 10**6)
    trainable, _ = functional.split_trainable(params, cfg.train.freeze)
    if options.get("compile"):
        options = {**options, "compile": _BACKEND.value}
    step = seg_train.make_train_step(model, s.loss_fn, optimizer, schedule, trainable=trainable,
                                     frozen_modules=cfg.train.freeze,
                                     aux_weight=cfg.loss.aux_weight, donate=True, **options)
    state = seg_train.init_state(params, buffers, optimizer, trainable,
                                 channels_last=options.get("channels_last", False))

    def run(n):
        nonlocal state
        for _ in range(n):
            state, m = step(state, s.batch)
        return m["loss"]
    return run


def imperative_runner(s: Setup, torchvision_model: bool):
    cfg = s.cfg
    _, params, buffers = s.init()
    if torchvision_model:
        model = TORCHVISION[s.name](weights=None, weights_backbone=None,
                                    num_classes=cfg.data.num_classes, aux_loss=cfg.model.aux)
    else:
        model = models.build(cfg.model, cfg.data.num_classes)
    model.load_state_dict({**params, **buffers})  # strict: torchvision's names are ours
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


def torch_optimizer(o, params):
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, foreach=True)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
               foreach=True)


def runner(s: Setup, mode: str):
    if MODES[mode] is None:
        return imperative_runner(s, torchvision_model=mode == "torchvision")
    return functional_runner(s, MODES[mode])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of n steps. On a CPU shared with other jobs
    the CPU time is the steadier measure of the work: preemption does not count in it."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    run(n)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------- peak memory
# Peak memory of a mode = what it keeps between steps (params, optimizer state, and for
# torch.optim the last step's .grad tensors) plus the most a steady-state step adds on top.


def cuda_step_peak(run, device: torch.device) -> int:
    """The most a step allocates above what was allocated before it."""
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


def cpu_peak_in_subprocess(s: Setup, mode: str) -> int | None:
    cmd = [sys.executable, __file__, f"--models={s.name}", f"--probe_memory={mode}",
           f"--batch_size={s.batch_size}", f"--image_size={s.image_size}",
           f"--num_classes={_CLASSES.value}", f"--keep_freed_memory={_KEEP.value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None  # reported as n/a: no /proc or glibc here, or the mode failed
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


# ---------------------------------------------------------------- timing


def time_model(s: Setup, modes: list[str]) -> dict:
    result = {"model": s.name, "label": s.label, "batch_size": s.batch_size,
              "image_size": s.image_size, "train_gflop_per_step": s.train_gflop, "modes": {},
              "skipped": {}}
    runners, first, resident = {}, {}, {}
    cuda_memory = _MEMORY.value and s.device.type == "cuda"
    for mode in modes:
        why = s.applies(mode)
        if why:
            result["skipped"][mode] = why
            continue
        before = torch.cuda.memory_allocated(s.device) if cuda_memory else 0
        runners[mode] = runner(s, mode)
        first[mode] = timed(runners[mode], 1, s.device)[0]
        progress(f"{s.name} {mode}: first call {first[mode]:.1f} s")
        if _WARMUP.value > 1:
            runners[mode](_WARMUP.value - 1)
        if cuda_memory:  # built and warmed one after another: the difference is this mode's
            resident[mode] = torch.cuda.memory_allocated(s.device) - before
    times, cpu_times = {mode: [] for mode in runners}, {mode: [] for mode in runners}
    order = list(runners)
    steps = _STEPS.value or (5 if s.device.type == "cuda" else 1)
    for r in range(_ROUNDS.value or (10 if s.device.type == "cuda" else 5)):
        k = r % len(order)
        for mode in order[k:] + order[:k]:
            wall, cpu = timed(runners[mode], steps, s.device)
            times[mode].append(wall / steps)
            cpu_times[mode].append(cpu / steps)
        progress(f"{s.name}: round {r + 1} done")
    for mode, ts in times.items():
        m = result["modes"][mode] = summarise(s, mode, ts, times.get("imperative"), first[mode])
        if s.device.type == "cpu":
            cs = cpu_times[mode]
            m.update(cpu_s_median=statistics.median(cs), cpu_s_all=cs,
                     x_imperative_cpu=paired_ratio(cs, cpu_times.get("imperative")))
        if cuda_memory:
            m["peak_mem_bytes"] = resident[mode] + cuda_step_peak(runners[mode], s.device)
    del runners
    torch._dynamo.reset()  # compiled steps share one code object: keep its cache small
    if _MEMORY.value and s.device.type == "cpu":
        for mode in times:  # compiled modes would compile again per process: left out on CPU
            if not MODES[mode] or not MODES[mode].get("compile"):
                result["modes"][mode]["peak_mem_bytes"] = cpu_peak_in_subprocess(s, mode)
                progress(f"{s.name} {mode}: peak memory measured")
    return result


def paired_ratio(ts: list[float], base: list[float] | None) -> float | None:
    """Median over rounds of this round's time over the baseline's in the same round."""
    return statistics.median(t / b for t, b in zip(ts, base)) if base else None


def summarise(s: Setup, mode: str, ts: list[float], base: list[float] | None,
              first: float) -> dict:
    med = statistics.median(ts)
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else ts * 3
    out = {"step_s_median": med, "step_s_q1": q1, "step_s_q3": q3, "step_s_all": ts,
           "images_per_s": s.batch_size / med, "first_call_s": first,
           "tflops": s.train_gflop / med / 1e3,
           "x_imperative": paired_ratio(ts, base)}
    if s.device.type == "cuda":
        bf16 = (MODES[mode] or {}).get("precision") == "bf16"
        out["peak_tflops"] = _PEAK.value if bf16 else _PEAK32.value
        out["pct_peak"] = 100 * out["tflops"] / out["peak_tflops"]
    return out


def table_head(gpu: bool) -> str:
    head = ("| model | mode | step median (IQR) | images/s | x imperative | first call | "
            "peak mem | TFLOP/s |" + (" % peak |" if gpu else ""))
    return head + "\n|" + "---|" * (head.count("|") - 1)


def table_rows(r: dict, gpu: bool) -> str:
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
            + (f" {m['pct_peak']:.1f} |" if gpu else ""))
    for mode, why in r["skipped"].items():
        rows.append(f"| {r['label']} | {mode} | skipped: {why} |" + " |" * (5 + gpu))
    return "\n".join(rows)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # a CPU run takes an hour: show where it is


# ---------------------------------------------------------------- explain


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


# --vmap_seeds: name -> (label, config module, model overrides), at CamVid's 11 classes
VMAP_MODELS = {"unet": ("UNet, base 16", unet, {"base_channels": 16}),
               "pspnet": ("PSPNet-R18", pspnet, {"backbone": "resnet18"})}


def vmap_seeds(device: torch.device, env: dict) -> None:
    """The train.num_seeds table: seg.seeds_bench.benchmark per model and mode."""
    gpu, rows = device.type == "cuda", []
    ks = [int(k) for k in _VMAP_SEEDS.value]
    for name in _VMAP_MODELS.value:
        label, module, overrides = VMAP_MODELS[name]
        for mode in _VMAP_MODES.value:
            cfg = module.get_config()
            cfg.model.update(overrides)
            cfg.data.num_classes = 11
            options = MODES[mode]
            cfg.train.precision = options.get("precision", "fp32")
            cfg.train.channels_last = options.get("channels_last", False)
            cfg.train.compile = _BACKEND.value if options.get("compile") else False
            progress(f"{label} {mode}: K = {ks}")
            found = seeds_bench.benchmark(
                cfg, ks, batch_size=_BATCH.value or (8 if gpu else 2),
                crop=tuple(int(v) for v in _VMAP_CROP.value), device=device,
                rounds=_ROUNDS.value, warmup=_WARMUP.value)
            rows += [{**r, "label": label, "mode": mode} for r in found]
            print(seeds_bench.markdown(found, lambda r: f"{label} {mode}"), flush=True)
            if _OUT.value:
                rundir.write_json(_OUT.value, {"results": rows, "environment": env})


def main(argv):
    del argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _KEEP.value:
        runtime.keep_freed_memory()  # CPU steps re-allocate big tensors; see seg/runtime.py
    vmap_modes = [m for m, o in MODES.items() if o is not None and m != "checkpoint"]
    for flag, given, known in (("models", _MODELS.value, MODELS), ("modes", _MODES.value, MODES),
                               ("vmap_models", _VMAP_MODELS.value, VMAP_MODELS),
                               ("vmap_modes", _VMAP_MODES.value, vmap_modes)):
        if set(given) - set(known):
            sys.exit(f"error: --{flag} has {sorted(set(given) - set(known))}, not one of "
                     f"{list(known)}")
    gpu = device.type == "cuda"
    batch, size = _BATCH.value or (16 if gpu else 2), _SIZE.value or (512 if gpu else 128)
    setups = (Setup(name, device, batch, size) for name in _MODELS.value)
    if _PROBE.value:
        print(json.dumps({"peak_bytes": cpu_peak(next(setups), _PROBE.value)}))
        return
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "device": torch.cuda.get_device_name(device) if gpu else "cpu",
           "threads": torch.get_num_threads(), "keep_freed_memory": _KEEP.value,
           "argv": sys.argv, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    if _VMAP_SEEDS.value:
        return vmap_seeds(device, env)
    results = []
    if not _EXPLAIN.value:
        print(table_head(gpu), flush=True)
    for s in setups:  # results are printed and saved model by model
        if _EXPLAIN.value:
            r = explain(s)
            print(f"{r['model']} {r['options']}: {r['graph_count']} graph(s), "
                  f"{r['graph_break_count']} break(s), {r['op_count']} ops "
                  f"{r['break_reasons'] or ''}", flush=True)
        else:
            r = time_model(s, _MODES.value)
            print(table_rows(r, gpu), flush=True)
        results.append(r)
        if _OUT.value:
            rundir.write_json(_OUT.value, {"results": results, "environment": env})


if __name__ == "__main__":
    app.run(main)
