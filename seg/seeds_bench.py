"""What train.num_seeds=K buys: one vmapped step of K members (seg/seeds.py) against K separate
steps, one after another, of the same members on the same batches: what K runs cost when they
take turns on one device. experiments/benchmark.py --vmap_seeds prints the table; a GPU check
can call `benchmark` for each config it cares about.

Both sides are the steps the loop runs (seg.experiment.train_step of the config, state donated),
at the config's precision, memory format and compile setting. The two are timed in turns, the
order alternating each round, so drift of a shared machine hits both; the speedup is the median
over rounds of the per-round ratio. Data loading is not timed (each member's batch is made once;
its cost is loader_bench.py --num_seeds's).
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from seg import experiment, losses, seeds
from seg import train as steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _members(cfg, k: int, device: torch.device):
    """(vmapped step and its stacked state, single steps and their states, dropout streams)."""
    one = copy.deepcopy(cfg)
    one.train.num_seeds = 1
    many = copy.deepcopy(cfg)
    many.train.num_seeds = k
    model, _, _, _ = experiment.init_model(one, device, pretrained=False)
    loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
    single, optimizer, trainable = experiment.train_step(one, model, loss_fn)
    stacked_step, _, _ = experiment.train_step(many, model, loss_fn)
    states = []
    for s in range(k):
        member = copy.deepcopy(one)
        member.seed = cfg.seed + s
        _, p, b, _ = experiment.init_model(member, device, pretrained=False)
        states.append(steps.init_state(p, b, optimizer, trainable,
                                       channels_last=cfg.train.channels_last))
    stacked = seeds.stack_states(states)  # copies: the single steps own `states`
    rngs = [seeds.SeedRng(cfg.seed + s, device) for s in range(k)]
    return (stacked_step, stacked), (single, states), rngs


def benchmark(cfg, num_seeds=(2, 4, 8), *, batch_size: int | None = None,
              crop: tuple[int, int] = (176, 240), device: torch.device | str | None = None,
              rounds: int | None = None, warmup: int = 1) -> list[dict]:
    """For each K: the median seconds of one vmapped step of K members ("vmap_s") and of K
    separate steps ("sequential_s"), their interquartile ranges, the speedup (median of the
    per-round sequential / vmap ratios; above 1 the vmapped step is faster), images/s of
    each, and on a GPU the memory each step needs above the states it starts from
    ("*_step_mib": activations; K members' at once for vmap, one member's for the others).
    cfg: a model config (its train.precision, channels_last, compile and optimizer are used;
    data.num_classes sets the outputs). batch_size: images per member (default: the
    config's); crop: the (H, W) of the images; rounds: timed rounds (default 10 on a GPU, 3 on
    the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or cfg.train.batch_size
    rounds = rounds or (10 if device.type == "cuda" else 3)
    return [_time(cfg, k, batch_size, crop, device, rounds, warmup) for k in num_seeds]


def _time(cfg, k: int, batch_size: int, crop, device: torch.device, rounds: int,
          warmup: int) -> dict:
    g = torch.Generator().manual_seed(k)
    images = torch.randn(k, batch_size, 3, *crop, generator=g).to(device)
    masks = torch.randint(0, cfg.data.num_classes, (k, batch_size, *crop), generator=g).to(device)
    (stacked_step, stacked), (single, singles), rngs = _members(cfg, k, device)

    def run_vmap():
        nonlocal stacked
        stacked, _ = stacked_step(stacked, (images, masks), rngs)

    def run_sequential():
        for s in range(k):
            singles[s], _ = single(singles[s], (images[s], masks[s]))

    timed = {"vmap": run_vmap, "sequential": run_sequential}
    for _ in range(warmup):
        for fn in timed.values():
            fn()
    _sync(device)
    seconds = {name: [] for name in timed}
    extra = {}
    for r in range(rounds):
        for name in (list(timed) if r % 2 == 0 else list(timed)[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            timed[name]()
            _sync(device)
            seconds[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                extra[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return _row(cfg, k, batch_size, crop, device, seconds, extra)


def _row(cfg, k, batch_size, crop, device, seconds, extra) -> dict:
    def median(xs):
        return statistics.median(xs)

    def iqr(xs):
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return q[2] - q[0]

    images = k * batch_size
    v, s = median(seconds["vmap"]), median(seconds["sequential"])
    row = {"model": cfg.model.name, "backbone": cfg.model.get("backbone"),
           "num_seeds": k, "batch_size": batch_size, "crop": list(crop),
           "device": str(device), "precision": cfg.train.precision,
           "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
           "vmap_s": v, "vmap_iqr_s": iqr(seconds["vmap"]),
           "sequential_s": s, "sequential_iqr_s": iqr(seconds["sequential"]),
           "speedup": median([b / a for a, b in zip(seconds["vmap"], seconds["sequential"])]),
           "vmap_images_per_s": images / v, "sequential_images_per_s": images / s,
           "rounds": len(seconds["vmap"]), "threads": torch.get_num_threads()}
    if extra:
        row["vmap_step_mib"], row["sequential_step_mib"] = extra["vmap"], extra["sequential"]
    return row


def markdown(rows: list[dict], label=lambda r: r["model"]) -> str:
    """The rows as a table: per model and K, both step times, the speedup, images/s."""
    lines = ["| model | K | batch per member | vmapped step | K sequential steps | speedup | "
             "images/s vmapped / sequential |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r)} | {r['num_seeds']} | {r['batch_size']} | "
                     f"{r['vmap_s'] * 1e3:.0f} ms | {r['sequential_s'] * 1e3:.0f} ms | "
                     f"{r['speedup']:.2f}x | {r['vmap_images_per_s']:.1f} / "
                     f"{r['sequential_images_per_s']:.1f} |")
    return "\n".join(lines)


def run(configs, num_seeds, *, batch_size: int | None = None, crop=(176, 240),
        device: torch.device | str | None = None, rounds: int | None = None, warmup: int = 1,
        out: str | None = None, environment: dict | None = None) -> list[dict]:
    """`benchmark` for each (label, config) of `configs`, each table printed as it is measured
    and every row written to `out` (JSON) after each config."""
    from seg import rundir

    rows = []
    for label, cfg in configs:
        print(f"{label}: K = {list(num_seeds)}", file=sys.stderr, flush=True)
        found = benchmark(cfg, num_seeds, batch_size=batch_size, crop=crop, device=device,
                          rounds=rounds, warmup=warmup)
        rows += [{**r, "label": label} for r in found]
        print(markdown(found, lambda r: label), flush=True)
        if out:
            rundir.write_json(out, {"results": rows, "environment": environment or {}})
    return rows
