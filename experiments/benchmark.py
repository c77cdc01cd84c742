"""Train-step speed of every model, every way of running it, side by side in one process.

  python experiments/benchmark.py --out=cpu.json          # CPU: batch 2 at 128x128
  python experiments/benchmark.py --out=gpu.json          # GPU: batch 16 at 512x512
  python experiments/benchmark.py --models=unet,pspnet --modes=eager,imperative,fast
  python experiments/benchmark.py --explain --models=unet,pspnet --image_size=64

Modes (each skipped where it does not apply):
  imperative     the baseline: the same nn.Module (loaded from our initial params) trained with
                 loss.backward() and torch.optim (foreach), frozen params excluded;
  torchvision    torchvision's fcn_resnet50 / deeplabv3_resnet50 / lraspp_mobilenet_v3_large
                 (weights=None, our params loaded under its names) in that same loop;
  eager          seg.train.make_train_step, eager, state donated (as experiments/train.py);
  compile        the same step under torch.compile (--compile_backend, fullgraph);
  bf16, fp16     bf16 / fp16 autocast forward (fp16 with dynamic loss scaling), fp32 weights;
  channels_last  channels_last images and conv weights;
  fast           compile + bf16 + channels_last (fast_fp16: with fp16, for GPUs without bf16);
  checkpoint     eager with activation checkpointing of the encoder's blocks / UNet double convs.
How they are timed (round-robin, paired ratios, FLOPs, MFU, peak memory): seg/bench.py.
--explain instead runs torch._dynamo.explain over the fast step and prints graphs and breaks.
--vmap_seeds=2,4,8 instead times train.num_seeds: one vmapped step of K members against K
separate steps (seg/seeds_bench.py), for --vmap_models in --vmap_modes.
"""
from __future__ import annotations

import sys

import torch
from absl import flags

from configs import benchmarks
from seg import bench, cli, seeds_bench

_MODELS = flags.DEFINE_list("models", list(benchmarks.MODELS),
                            f"Models to time, of {list(benchmarks.MODELS)}.")
_MODES = flags.DEFINE_list("modes", [m for m in bench.MODES if m != "fast_fp16"],
                           f"Modes to time, of {list(bench.MODES)}.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch size (default: 16 on GPU, 2 on CPU).")
_SIZE = flags.DEFINE_integer("image_size", None, "Square input size (512 on GPU, 128 on CPU).")
_CLASSES = flags.DEFINE_integer("num_classes", 21, "Output classes (21: PASCAL VOC).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per round and mode (5 GPU, 1 CPU).")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Round-robin rounds (10 GPU, 5 CPU).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per mode, the first call included.")
_BACKEND = flags.DEFINE_string("compile_backend", "inductor", "torch.compile backend.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "The peak MFU is held against (default on GPU: "
                           "a bf16 matrix product measured first; on CPU: no MFU).")
_MEMORY = flags.DEFINE_bool("memory", True, "Measure peak memory (CPU: one process per mode).")
_EXPLAIN = flags.DEFINE_bool("explain", False, "Run torch._dynamo.explain instead of timing.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")
_KEEP = flags.DEFINE_bool("keep_freed_memory", True, "seg.runtime.keep_freed_memory (glibc).")
_VMAP_SEEDS = flags.DEFINE_list("vmap_seeds", [], "Numbers of members K: time train.num_seeds "
                                "(one vmapped step of K against K steps) instead of the modes.")
_VMAP_MODELS = flags.DEFINE_list("vmap_models", list(benchmarks.VMAP_MODELS),
                                 f"--vmap_seeds: of {list(benchmarks.VMAP_MODELS)}.")
_VMAP_MODES = flags.DEFINE_list("vmap_modes", ["eager"], "--vmap_seeds: of eager, bf16, "
                                "channels_last, compile, fast.")
_VMAP_CROP = flags.DEFINE_list("vmap_crop", ["176", "240"], "--vmap_seeds: image H,W (CamVid "
                               "at half resolution).")


def main(argv):
    del argv
    for flag, given, known in (("models", _MODELS.value, benchmarks.MODELS),
                               ("modes", _MODES.value, bench.MODES)):
        if set(given) - set(known):
            sys.exit(f"error: --{flag} has {sorted(set(given) - set(known))}, not one of "
                     f"{list(known)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if _VMAP_SEEDS.value:
        configs = [(f"{label} {mode}", cfg) for name in _VMAP_MODELS.value
                   for mode in _VMAP_MODES.value
                   for label, cfg in [benchmarks.vmap_model(name, **_vmap_options(mode))]]
        seeds_bench.run(configs, [int(k) for k in _VMAP_SEEDS.value],
                        batch_size=_BATCH.value or (8 if gpu else 2),
                        crop=tuple(int(v) for v in _VMAP_CROP.value), device=device,
                        rounds=_ROUNDS.value, warmup=_WARMUP.value, out=_OUT.value)
        return
    batch, size = _BATCH.value or (16 if gpu else 2), _SIZE.value or (512 if gpu else 128)
    setups = (bench.Setup(cfg, device, batch, size, label, name) for name, (label, cfg) in
              ((n, benchmarks.model(n, _CLASSES.value)) for n in _MODELS.value))
    bench.run_models(setups, _MODES.value, rounds=_ROUNDS.value or (10 if gpu else 5),
                     steps=_STEPS.value or (5 if gpu else 1), warmup=_WARMUP.value,
                     backend=_BACKEND.value, memory=_MEMORY.value, peak_tflops=_PEAK.value,
                     keep_freed_memory=_KEEP.value, explain_only=_EXPLAIN.value, out=_OUT.value)


def _vmap_options(mode: str) -> dict:
    if mode not in ("eager", "bf16", "channels_last", "compile", "fast"):
        sys.exit(f"error: --vmap_modes has {mode!r}, not one of eager, bf16, channels_last, "
                 "compile, fast")
    options = bench.MODES[mode]
    return {"precision": options.get("precision", "fp32"),
            "channels_last": options.get("channels_last", False),
            "compile": _BACKEND.value if options.get("compile") else False}


if __name__ == "__main__":
    cli.run(main)
