"""Summarises run directories: a markdown table, and plots when matplotlib is installed
(experiments/report.py is the command).

Runs are given as directories or glob patterns; a run directory is one with a summary.json
(seg/rundir.py). The table has one row
per run: model, parameters, steps, wall time, train images/s, the last val eval's mIoU, pixel
accuracy and per-class IoU (named by the dataset's classes), and the test mIoU. Next to the
markdown go <stem>_curves.png (the main head's train loss and the val loss, which measure the
same thing, and val mIoU against step) and <stem>_per_class_iou.png.
matplotlib is optional: without it the table is still written and the plots are reported as
skipped, with the reason.
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from seg import compare, rundir
from seg.errors import ConfigError


def find_runs(patterns) -> list[Path]:
    """Run directories matched by the patterns, in order, each once."""
    runs: list[Path] = []
    for pattern in patterns:
        found = [Path(m) for m in sorted(glob.glob(pattern))
                 if (Path(m) / "summary.json").is_file()]
        if not found:
            raise ConfigError(f"{pattern!r} matches no run directory (a folder with summary.json)")
        runs += [r for r in found if r not in runs]
    return runs


def load_run(workdir: Path, label: str) -> dict:
    return {"label": label, "dir": workdir, "records": rundir.RunDir(workdir).log.read(),
            "summary": rundir.RunDir(workdir).summary()}


def load_runs(patterns) -> list[dict]:
    dirs = find_runs(patterns)
    # Labels: paths below the runs' common folder, so that seed0 / seed1 of two variants differ.
    base = Path(os.path.commonpath([d.resolve() for d in dirs]))
    labels = [str(d.resolve().relative_to(base)) if len(dirs) > 1 else d.name for d in dirs]
    return [load_run(d, label) for d, label in zip(dirs, labels)]


def class_names(runs) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run["summary"].get("class_names", []) if n not in names]
    return names


def per_class_iou(run: dict) -> dict:
    val = (run["summary"].get("last_eval") or {}).get("val") or {}
    return dict(zip(run["summary"].get("class_names", []), val.get("iou_per_class", [])))


def table(runs) -> str:
    names = class_names(runs)
    header = ["run", "model", "params", "steps", "wall time", "images/s", "val mIoU",
              "val pixel acc", "test mIoU", *[f"IoU {n}" for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        s = run["summary"]
        last = s.get("last_eval") or {}
        val, test = last.get("val") or {}, last.get("test") or {}
        iou = per_class_iou(run)
        cells = [run["label"], s["model"]["name"], _count(s["model"]["params"]),
                 str(s["steps"]), _duration(s.get("wall_time_s")),
                 _number(s.get("images_per_s"), 1), _number(val.get("miou")),
                 _number(val.get("pixel_acc")), _number(test.get("miou")),
                 *[_number(iou.get(n)) for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(v, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _duration(seconds) -> str:
    if seconds is None:
        return "n/a"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt
    return plt


def plot_curves(plt, runs, path: Path) -> None:
    """The main head's loss (train solid, val dashed) and val mIoU against step, one colour per
    run. The train records' "loss" adds the auxiliary head's; "loss_main" is the quantity the
    val loss measures (older runs without it fall back to "loss")."""
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        train = [(r["step"], r.get("loss_main", r["loss"])) for r in run["records"]
                 if r["split"] == "train" and r.get("loss_main", r["loss"]) is not None]
        val = [r for r in run["records"] if r["split"] == "val"]
        if train:
            ax_loss.plot(*zip(*train), color=colour)
        val_loss = [(r["step"], r["loss"]) for r in val if r.get("loss") is not None]
        if val_loss:
            ax_loss.plot(*zip(*val_loss), "--o", color=colour, markersize=3)
        val_miou = [(r["step"], r["miou"]) for r in val if r.get("miou") is not None]
        ax_miou.plot(*(zip(*val_miou) if val_miou else ([], [])), "-o", color=colour,
                     markersize=3, label=run["label"])  # an entry even without evals
    ax_loss.set(xlabel="step", ylabel="loss", title="main-head loss (train solid, val dashed)")
    ax_miou.set(xlabel="step", ylabel="mIoU", title="val mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    _legend_outside(ax_miou)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class(plt, runs, path: Path) -> None:
    """Grouped bars: the last val IoU of each class, one bar per run."""
    names = class_names(runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(names) + 4), 4.5))
    for i, run in enumerate(runs):
        iou = per_class_iou(run)
        values = [math.nan if iou.get(n) is None else iou[n] for n in names]
        xs = [c - 0.4 + width * (i + 0.5) for c in range(len(names))]
        ax.bar(xs, values, width, label=run["label"], color=f"C{i % 10}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="IoU", ylim=(0, 1), title="per-class IoU (last val eval)")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _legend_outside(ax) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def write_report(patterns, out: str | Path, plots: bool = True) -> tuple[str, list[str]]:
    """Writes the markdown (and the plots); returns it and what was done, one line each."""
    runs, out = load_runs(patterns), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines, done = [f"# Report: {len(runs)} runs", "", table(runs), ""], []
    plt = pyplot() if plots else None
    if plots and plt is None:
        done.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
        lines.append("Plots skipped: matplotlib is not installed.")
    elif plt is not None:
        for suffix, draw in (("curves", plot_curves), ("per_class_iou", plot_per_class)):
            path = out.with_name(f"{out.stem}_{suffix}.png")
            draw(plt, runs, path)
            lines.append(f"![{suffix}]({path.name})")
            done.append(f"-> {path}")
    text = "\n".join(lines) + "\n"
    rundir.replace_atomically(out, lambda f: f.write(text))
    return text, [*done, f"-> {out} ({len(runs)} runs)"]


def comparison(patterns_a, patterns_b, split: str = "val", resamples: int = 10_000) -> str:
    """B's runs (seeds) against A's on `split`: for mIoU and pixel accuracy, the difference, its
    95% paired-bootstrap interval over images (and seeds) and the sign-flip fraction."""
    a, b = find_runs(patterns_a), find_runs(patterns_b)
    name_a, name_b = _side_name(a), _side_name(b)
    lines = [f"{name_b} ({len(b)} runs) against {name_a} ({len(a)} runs), {split} split:"]
    for result in compare.compare_runs(a, b, split, resamples=resamples):
        lines.append("  " + result.line(name_a, name_b))
    lines.append("  * the interval excludes zero; method: seg/compare.py (paired bootstrap)")
    return "\n".join(lines)


def _side_name(runs: list[Path]) -> str:
    """The runs' folder when they are the seeds of one variant (.../<variant>/seed<k>)."""
    parents = {r.resolve().parent for r in runs}
    return (parents.pop().name if len(parents) == 1 and len(runs) > 1 else
            ",".join(r.name for r in runs))
