"""Sweeps: every variant of a study with every seed, one run directory each, mean and std.

  <root>/<variant>/seed<k>/   an ordinary run directory per variant and seed
  <root>/summary.json         per variant: the runs, and mean / std / n over the seeds of
                              val mIoU, val pixel acc, test mIoU and train time; and against
                              the baseline variant, the difference in mIoU and pixel accuracy
                              (val and test) with its 95% paired-bootstrap interval over images
                              and seeds and the sign-flip fraction (seg/compare.py)
A run already finished with the same config is read, not trained again; an unfinished one
resumes from its checkpoint. With vmap=True the seeds of a variant train together, as one run
of train.num_seeds in <root>/<variant> (seg/seeds_loop.py) whose members are the same
<root>/<variant>/seed<k> directories: either way of training reads the other's runs back.
The studies (variants of a base config) are in configs/ablations.py; experiments/ablate.py
runs one from the command line.
"""
from __future__ import annotations

import copy
import math
import re
import statistics
from pathlib import Path

from seg import compare
from seg import config as config_lib
from seg import experiment, loop, rundir
from seg.errors import ConfigError

# (summary key, eval split, metric) of the numbers compared across variants
METRICS = (("val_miou", "val", "miou"), ("val_pixel_acc", "val", "pixel_acc"),
           ("test_miou", "test", "miou"))
COLUMNS = (("val_miou", "val mIoU"), ("val_pixel_acc", "val pixel acc"),
           ("test_miou", "test mIoU"), ("train_time_s", "train time (s)"))


def swept_fields(configs: dict) -> set[str]:
    """Dotted keys whose values differ between the variants' configs."""
    flat = [config_lib.flatten(c.to_dict()) for c in configs.values()]
    keys = set().union(*flat)
    return {k for k in keys if len({repr(f.get(k)) for f in flat}) > 1}


def plan(configs: dict, seeds, steps=None, overrides=()) -> list[tuple[str, int, object]]:
    """(variant, seed, config) of every run: overrides, then steps and seed, applied to a copy."""
    for name in configs:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"variant name {name!r} must be usable as a directory name")
    parsed = [config_lib.parse_override(o) for o in overrides]
    if any(k == "train.num_seeds" for k, _ in parsed):
        raise ConfigError("--override sets train.num_seeds: use --vmap to train the seeds of "
                          "a variant together")
    clash = sorted({k for k, _ in parsed} & swept_fields(configs))
    if clash:
        raise ConfigError(f"--override sets {', '.join(clash)}, which the sweep varies")
    runs = []
    for name, base in configs.items():
        for seed in seeds:
            cfg = copy.deepcopy(base)  # keeps FieldReferences linked, unlike copy_and_resolve
            for key, value in parsed:
                try:
                    config_lib.set_field(cfg, key, value)
                except ConfigError as e:
                    raise ConfigError(f"--override {e}") from None
            if steps is not None:
                cfg.train.steps = steps
            cfg.seed = seed
            runs.append((name, seed, cfg))
    return runs


def run_one(cfg, workdir: Path) -> dict:
    """Trains (or resumes) one run, or reads it back when it has already finished; its summary."""
    run = rundir.RunDir(workdir)
    run.check_usable(cfg)  # never reuse a directory of another config
    if run.finished(cfg) is None:
        loop.train_and_evaluate(cfg, workdir)
    return run.summary()


def vmap_groups(runs: list[tuple[str, int, object]]) -> list[tuple[str, int, object]]:
    """One (variant, first seed, config with train.num_seeds = the number of seeds) per
    variant of `plan`'s runs, whose seeds must be consecutive (a run of train.num_seeds=K
    trains seed, seed+1, ..., seed+K-1)."""
    seeds = sorted({seed for _, seed, _ in runs})
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ConfigError(f"--vmap trains the seeds s, s+1, ... of a variant as one run: "
                          f"--seeds={','.join(map(str, seeds))} are not consecutive")
    groups = []
    for name, seed, cfg in runs:
        if seed == seeds[0]:
            cfg.train.num_seeds = len(seeds)
            groups.append((name, seed, cfg))
    return groups


def run_group(cfg, workdir: Path) -> list[dict]:
    """Trains (or resumes, or reads back) the members of a train.num_seeds run in
    workdir/seed<k>; their records."""
    print(f"== {workdir.name} seeds {cfg.seed}..{cfg.seed + cfg.train.num_seeds - 1} "
          f"(one vmapped run) -> {workdir}", flush=True)
    return loop.train_and_evaluate(cfg, workdir)["runs"]  # seg.seeds_loop: run_record's


def run_record(summary: dict, seed: int, workdir: Path) -> dict:
    """The compared numbers of one run (None where the run has no such eval)."""
    last = summary.get("last_eval") or {}
    record = {"seed": seed, "workdir": str(workdir), "steps": summary["steps"]}
    for key, split, metric in METRICS:
        record[key] = (last.get(split) or {}).get(metric)
    record["train_time_s"] = summary.get("train_time_s")
    return record


def aggregate(values) -> dict:
    """mean, sample standard deviation (n - 1; None for one value) and n of the non-missing
    values (NaN metrics are stored as null)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present)}


def run_sweep(configs: dict, root: Path, seeds, steps=None, overrides=(),
              baseline: str | None = None, resamples: int = 10_000, vmap: bool = False) -> dict:
    """Runs every variant with every seed (all configs validated first) and writes
    <root>/summary.json. baseline: the variant the others are compared with (default: the
    first). vmap: all seeds of a variant (consecutive) train at once as one run of
    train.num_seeds (seg/seeds.py) in <root>/<variant>, whose members are the same
    <root>/<variant>/seed<k> run directories."""
    baseline = baseline or next(iter(configs))
    if baseline not in configs:
        raise ConfigError(f"--baseline={baseline!r} is not a variant ({', '.join(configs)})")
    runs = plan(configs, [int(s) for s in seeds], steps, overrides)
    vmap = vmap and len(runs) > len(configs)  # one seed: nothing to train together
    if vmap:
        runs = vmap_groups(runs)
    for name, seed, cfg in runs:
        try:
            experiment.check(cfg)
        except ConfigError as e:
            raise ConfigError(f"variant {name}: {e}") from None
    records: dict[str, list] = {name: [] for name in configs}
    for name, seed, cfg in runs:
        try:
            if vmap:
                records[name] += run_group(cfg, root / name)
                continue
            workdir = root / name / f"seed{seed}"
            print(f"== {name} seed {seed} -> {workdir}", flush=True)
            summary = run_one(cfg, workdir)
        except ConfigError as e:
            raise ConfigError(f"variant {name}{'' if vmap else f' seed {seed}'}: {e}") from None
        records[name].append(run_record(summary, seed, workdir))
    result = {"root": str(root), "seeds": [int(s) for s in seeds], "steps": steps,
              "overrides": list(overrides), "swept": sorted(swept_fields(configs)),
              "baseline": baseline,
              "variants": {name: {"runs": rs, **{key: aggregate([r[key] for r in rs])
                                                 for key, _ in COLUMNS},
                                  "vs_baseline": {} if name == baseline else
                                  vs_baseline(rs, records[baseline], resamples)}
                           for name, rs in records.items()}}
    root.mkdir(parents=True, exist_ok=True)
    rundir.write_json(root / "summary.json", result)
    return result


def vs_baseline(runs: list[dict], base: list[dict], resamples: int) -> dict:
    """{split: {metric: Comparison as a dict}} of these runs (seeds) against the baseline's,
    for each split whose per-image results both sides have."""
    out = {}
    for split in ("val", "test"):
        try:
            a = compare.load([r["workdir"] for r in base], split)
            b = compare.load([r["workdir"] for r in runs], split)
        except ConfigError:  # no such split (or per-image results switched off)
            continue
        out[split] = {m: compare.paired_bootstrap(a, b, m, resamples=resamples)._asdict()
                      for m in ("miou", "pixel_acc")}
    return out


def markdown_table(result: dict) -> str:
    """One row per variant: mean +- std over its seeds ("n/a" where there is no value), and the
    val mIoU difference from the baseline with its 95% interval, starred where the interval
    excludes zero."""
    delta = f"Δ val mIoU vs {result['baseline']} [95% interval]"
    header = ["variant", *[label for _, label in COLUMNS], delta, "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, v in result["variants"].items():
        cells = [mean_std(v[key], 1 if key == "train_time_s" else 4) for key, _ in COLUMNS]
        cells.append("baseline" if name == result["baseline"] else _delta(v))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(v['runs'])} |")
    return "\n".join(lines)


def _delta(variant: dict) -> str:
    c = variant["vs_baseline"].get("val", {}).get("miou")
    if c is None:
        return "n/a"
    star = "*" if c["low"] > 0 or c["high"] < 0 else ""
    return f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]{star}"


def mean_std(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def sweep_and_report(configs: dict, root: str | Path, seeds, steps=None, overrides=(),
                     baseline: str | None = None, vmap: bool = False) -> str:
    """run_sweep, then its markdown table and where the summary went (the ablation command)."""
    try:
        seeds = [int(s) for s in seeds]
    except ValueError:
        raise ConfigError(f"--seeds={','.join(map(str, seeds))} must be integers") from None
    result = run_sweep(configs, Path(root), seeds, steps, overrides, baseline, vmap=vmap)
    note = ("* the 95% paired-bootstrap interval over images and seeds excludes zero "
            "(seg/compare.py)")
    return f"{markdown_table(result)}\n{note}\n-> {Path(root) / 'summary.json'}"
