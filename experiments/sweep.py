"""What the ablation scripts share: variants x seeds, one run directory each, mean and std.

An ablation script defines `variants(preset) -> {name: config}` and calls `sweep.main(variants)`:

  <root>/<variant>/seed<k>/   one experiments/train.py run directory per variant and seed
  <root>/summary.json         per variant: the runs, and mean / std / n over the seeds of
                              val mIoU, val pixel acc, test mIoU and train time
and prints the summary as a markdown table. A run already finished with the same config is read,
not trained again; an unfinished one resumes from its checkpoint.
"""
from __future__ import annotations

import ast
import copy
import json
import math
import re
import statistics
import sys
from pathlib import Path

from absl import app, flags

# (summary key, eval split, metric) of the numbers compared across variants
METRICS = (("val_miou", "val", "miou"), ("val_pixel_acc", "val", "pixel_acc"),
           ("test_miou", "test", "miou"))
COLUMNS = (("val_miou", "val mIoU"), ("val_pixel_acc", "val pixel acc"),
           ("test_miou", "test mIoU"), ("train_time_s", "train time (s)"))


def set_field(cfg, key: str, value) -> None:
    """cfg.<key> = value for a dotted key; an unknown key or a wrong type is a ValueError."""
    *path, leaf = key.split(".")
    node = cfg
    try:
        for part in path:
            node = node[part]
        if leaf not in node:
            raise KeyError(leaf)
        node[leaf] = tuple(value) if isinstance(value, list) else value
    except (KeyError, AttributeError, TypeError) as e:
        detail = "no such field" if isinstance(e, (KeyError, AttributeError)) else e
        raise ValueError(f"{key}={value!r}: {detail}") from None


def parse_override(item: str) -> tuple[str, object]:
    """'a.b=value' -> ("a.b", value): a Python literal where it parses as one, else a string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--override={item!r} is not key=value")
    text = {"true": "True", "false": "False"}.get(text, text)
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


def swept_fields(configs: dict) -> set[str]:
    """Dotted keys whose values differ between the variants' configs."""
    flat = [_flatten(c.to_dict()) for c in configs.values()]
    keys = set().union(*flat)
    return {k for k in keys if len({repr(f.get(k)) for f in flat}) > 1}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plan(configs: dict, seeds, steps=None, overrides=()) -> list[tuple[str, int, object]]:
    """(variant, seed, config) of every run: overrides, then steps and seed, applied to a copy."""
    for name in configs:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"variant name {name!r} must be usable as a directory name")
    parsed = [parse_override(o) for o in overrides]
    clash = sorted({k for k, _ in parsed} & swept_fields(configs))
    if clash:
        raise ValueError(f"--override sets {', '.join(clash)}, which the sweep varies")
    runs = []
    for name, base in configs.items():
        for seed in seeds:
            cfg = copy.deepcopy(base)  # keeps FieldReferences linked, unlike copy_and_resolve
            for key, value in parsed:
                try:
                    set_field(cfg, key, value)
                except ValueError as e:
                    raise ValueError(f"--override {e}") from None
            if steps is not None:
                cfg.train.steps = steps
            cfg.seed = seed
            runs.append((name, seed, cfg))
    return runs


def _train_script():
    # Imported here, not at the top: importing it defines the required --config and --workdir
    # flags, which an ablation script's command line does not give.
    from experiments import train
    return train


def run_one(cfg, workdir: Path) -> dict:
    """Trains (or resumes) one run, or reads it when it has already finished; its summary."""
    train = _train_script()
    train.check_same_config(workdir, cfg)  # never reuse a directory of another config
    if train.finished_summary(workdir, cfg) is None:
        train.run(cfg, workdir)
    return json.loads((workdir / "summary.json").read_text())


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


def run_sweep(configs: dict, root: Path, seeds, steps=None, overrides=()) -> dict:
    """Runs every variant with every seed (all configs validated first) and writes
    <root>/summary.json."""
    train = _train_script()
    runs = plan(configs, [int(s) for s in seeds], steps, overrides)
    for name, seed, cfg in runs:
        try:
            train.validate(cfg)
        except ValueError as e:
            raise ValueError(f"variant {name}: {e}") from None
    records: dict[str, list] = {name: [] for name in configs}
    for name, seed, cfg in runs:
        workdir = root / name / f"seed{seed}"
        print(f"== {name} seed {seed} -> {workdir}", flush=True)
        try:
            summary = run_one(cfg, workdir)
        except ValueError as e:
            raise ValueError(f"variant {name} seed {seed}: {e}") from None
        records[name].append(run_record(summary, seed, workdir))
    result = {"root": str(root), "seeds": [int(s) for s in seeds], "steps": steps,
              "overrides": list(overrides), "swept": sorted(swept_fields(configs)),
              "variants": {name: {"runs": rs, **{key: aggregate([r[key] for r in rs])
                                                 for key, _ in COLUMNS}}
                           for name, rs in records.items()}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown_table(result: dict) -> str:
    """One row per variant: mean +- std over its seeds ("n/a" where there is no value)."""
    header = ["variant", *[label for _, label in COLUMNS], "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, v in result["variants"].items():
        cells = [_mean_std(v[key], 1 if key == "train_time_s" else 4) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(v['runs'])} |")
    return "\n".join(lines)


def _mean_std(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def define_flags() -> None:
    """The ablation scripts' flags, defined when one runs as a script only: importing the
    modules (tests, notebooks) defines no flags, so none clashes with another script's."""
    flags.DEFINE_string("preset", None, "Dataset preset given to every config's get_config "
                        "(camvid, membrane, ...); default: the embedded data.")
    flags.DEFINE_integer("steps", None, "Train steps of every run (default: the config's).")
    flags.DEFINE_list("seeds", ["0", "1"], "Seeds (config.seed) each variant runs with.")
    flags.DEFINE_string("root", None, "Sweep directory (<root>/<variant>/seed<k>).")
    flags.DEFINE_multi_string("override", [], "key=value set in every run's config, e.g. "
                              "--override=train.batch_size=4 (repeatable).")
    flags.mark_flag_as_required("root")


def main(variants) -> None:
    """The command line of an ablation script: variants(preset) -> {name: config}."""
    define_flags()

    def _main(argv):
        f = flags.FLAGS
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            seeds = [int(s) for s in f.seeds]
        except ValueError:
            raise app.UsageError(f"--seeds={','.join(f.seeds)} must be integers") from None
        try:
            result = run_sweep(variants(f.preset), Path(f.root), seeds, f.steps, f.override)
        except ValueError as e:  # train.ConfigError included
            sys.exit(f"error: {e}")
        print(markdown_table(result))
        print(f"-> {Path(f.root) / 'summary.json'}")

    app.run(_main)
