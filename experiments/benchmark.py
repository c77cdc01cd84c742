"""Step-time benchmark: our functional train step against the imperative loop everyone knows.

  python experiments/benchmark.py                         # UNet and PSPNet, CPU-sized defaults
  python experiments/benchmark.py --models=pspnet --batch_size=16 --image_size=512 --out=b.json

For each model it times, interleaved round by round (the order alternating, ABBA) so that machine
drift hits both alike:
  functional: seg.train.make_train_step (functional_call + grad + pure optimizer), eager,
              with the state donated as experiments/train.py does;
  imperative: the same nn.Module with loss.backward() and torch.optim.
Both start from the same weights, use the same loss and optimizer settings, and see the same
batches. The ratio is the median over rounds of the paired per-round ratio, which cancels drift
that a ratio of two medians would keep. Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import pspnet as pspnet_config, unet as unet_config  # noqa: E402
from seg import runtime  # noqa: E402
from seg import functional, losses, models, optim, writers  # noqa: E402
from seg import train as seg_train  # noqa: E402

CONFIGS = {"unet": unet_config, "pspnet": pspnet_config}

_MODELS = flags.DEFINE_list("models", ["unet", "pspnet"], "Models to time (config names).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 64, "Square input size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per round and mode.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Interleaved rounds.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per mode before timing.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")
_KEEP = flags.DEFINE_bool("keep_freed_memory", True, "seg.runtime.keep_freed_memory (glibc).")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def functional_runner(cfg, device, batch):
    model, params, buffers = functional.init(lambda: models.build(cfg.model, cfg.data.num_classes),
                                             seed=0, device=device)
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 10**6)
    loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
    step = seg_train.make_train_step(model, loss_fn, optimizer, schedule, trainable=list(params),
                                     aux_weight=cfg.loss.aux_weight, donate=True)
    state = seg_train.init_state(params, buffers, optimizer, list(params))

    def run(n):
        nonlocal state
        for _ in range(n):
            state, m = step(state, batch)
        return m["loss"]
    return run


def imperative_runner(cfg, device, batch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build(cfg.model, cfg.data.num_classes).to(device).train()
    o = cfg.optimizer
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                              nesterov=o.nesterov, weight_decay=o.weight_decay)
    else:
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        opt = cls(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                  weight_decay=o.weight_decay)
    loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
    images, masks = batch

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = losses.total_loss(model(images), masks, loss_fn, cfg.loss.aux_weight)
            loss.backward()
            opt.step()
        return loss.detach()
    return run


def time_model(name: str, device: torch.device) -> dict:
    cfg = CONFIGS[name].get_config()
    cfg.schedule.name = "constant"
    b, s, k = _BATCH.value, _SIZE.value, cfg.data.num_classes
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(b, 3, s, s, generator=g).to(device),
             torch.randint(0, k, (b, s, s), generator=g).to(device))
    runners = {"functional": functional_runner(cfg, device, batch),
               "imperative": imperative_runner(cfg, device, batch)}
    for run in runners.values():
        run(_WARMUP.value)
    times = {mode: [] for mode in runners}
    for r in range(_ROUNDS.value):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for mode in order:
            run = runners[mode]
            sync(device)
            t0 = time.perf_counter()
            run(_STEPS.value).item()
            sync(device)
            times[mode].append((time.perf_counter() - t0) / _STEPS.value)
    result = {"model": name, "batch_size": b, "image_size": s, "device": str(device)}
    for mode, ts in times.items():
        med = statistics.median(ts)
        result[mode] = {"step_s_median": med, "step_s_min": min(ts), "step_s_max": max(ts),
                        "images_per_s": b / med, "step_s_all": ts}
    result["ratio_functional_over_imperative"] = statistics.median(
        f / i for f, i in zip(times["functional"], times["imperative"]))
    return result


def table(results: list[dict]) -> str:
    rows = ["| model | batch x size | mode | step (median) | min-max | images/s | "
            "functional / imperative (paired median) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for mode in ("imperative", "functional"):
            m = r[mode]
            ratio = f"{r['ratio_functional_over_imperative']:.3f}" if mode == "functional" else ""
            rows.append(f"| {r['model']} | {r['batch_size']} x {r['image_size']}^2 | {mode} | "
                        f"{m['step_s_median'] * 1e3:.1f} ms | {m['step_s_min'] * 1e3:.1f}-"
                        f"{m['step_s_max'] * 1e3:.1f} ms | {m['images_per_s']:.1f} | {ratio} |")
    return "\n".join(rows)


def main(argv):
    del argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _KEEP.value:
        runtime.keep_freed_memory()  # CPU steps re-allocate big tensors; see seg/runtime.py
    unknown = set(_MODELS.value) - set(CONFIGS)
    if unknown:
        sys.exit(f"error: --models has {sorted(unknown)}, not one of {sorted(CONFIGS)}")
    results = [time_model(name, device) for name in _MODELS.value]
    print(table(results))
    if _OUT.value:
        writers.write_json(_OUT.value, {"results": results, "threads": torch.get_num_threads(),
                                        "torch": torch.__version__,
                                        "keep_freed_memory": _KEEP.value})


if __name__ == "__main__":
    app.run(main)
