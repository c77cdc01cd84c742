"""Evaluating a split, during training or afterwards from a run directory.

`evaluate_split` is the one evaluation: the confusion matrix and the loss sums of the whole
split, accumulated on the device (sharded over the ranks of a data-parallel job and summed), so
the metrics and the loss are those of the split, whatever train.eval_batch_size and the number
of ranks. `evaluate_run` rebuilds a finished run from its directory and evaluates it with the
run's own forward (precision, memory format) and eval settings, each of which can be changed.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import ml_collections
import torch

from seg import distributed, experiment, inference, rundir, runtime
from seg import train as steps
from seg.data import Split, batches
from seg.distributed import World
from seg.errors import ConfigError, config_errors


def eval_batch_per_rank(eval_batch_size: int, world_size: int) -> int:
    """train.eval_batch_size is the global eval batch: each rank takes its share."""
    if eval_batch_size < 1 or eval_batch_size % world_size:
        raise ConfigError(f"train.eval_batch_size={eval_batch_size} must be a positive multiple "
                          f"of the world size {world_size} (it is the global eval batch)")
    return eval_batch_size // world_size


def evaluate_split(eval_step: steps.EvalStep, params, buffers, split: Split, cfg,
                   device: torch.device, world: World = World()) -> dict:
    """The metrics, loss and confusion matrix of a whole split (seg.train.EvalStep.scores),
    and "per_image" counts when the eval step makes them (cfg.eval.per_image)."""
    d = cfg.data
    shard = batches.eval_batches(
        split.dataset, split.transform, eval_batch_per_rank(cfg.train.eval_batch_size, world.size),
        device=device, workers=d.workers, pad_multiple=d.pad_multiple, rank=world.rank,
        world_size=world.size, prefetch=d.prefetch, indices=True)
    several = world.size > 1
    reduce = functools.partial(distributed.sum_across, group=world.group) if several else None
    gather = functools.partial(distributed.gather_objects, group=world.group) if several else None
    return steps.evaluate(eval_step, params, buffers, shard, reduce=reduce, gather=gather)


def save_per_image(run: rundir.RunDir, name: str, result: dict, split: Split, step: int,
                   split_name: str) -> None:
    """Moves result["per_image"] (if any) into <workdir>/per_image/<name>.npz."""
    per_image = result.pop("per_image", None)
    if per_image is not None:
        sources = [split.dataset.source(int(i)) for i in per_image["index"]]
        run.write_per_image(name, per_image, step=step, split=split_name, sources=sources,
                            class_names=split.dataset.info.class_names)


def set_eval(cfg, mode=None, window=None, stride=None, flip=None, scales=None) -> None:
    """Overrides cfg.eval with the settings given (None keeps the run's own)."""
    given = {"mode": mode, "flip": flip, "window": _numbers(window, int, "eval.window"),
             "stride": _numbers(stride, int, "eval.stride"),
             "scales": _numbers(scales, float, "eval.scales")}
    for key, value in given.items():
        if value is not None:
            cfg.eval[key] = value
    with config_errors():
        inference.from_config(cfg.eval)  # a bad value raises here, naming the field


def _numbers(values, kind, field):
    if values is None:
        return None
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ConfigError(f"{field}={','.join(map(str, values))} must be {kind.__name__}s"
                          ) from None


def restore(run: rundir.RunDir, checkpoint: str | os.PathLike | None, device
            ) -> tuple[dict, Path]:
    """(payload, file) of `checkpoint`: "last" (or None) the run's newest readable checkpoint,
    "best" its weights of the best val eval (train.best_metric), else a file. The payload's
    "state" holds "step", "params" and "buffers" in every case."""
    if checkpoint is None or str(checkpoint) == "last":
        found = run.newest_readable(map_location=device)
        if found is None:
            raise ConfigError(f"no readable checkpoint in {run.checkpoints}")
        return found
    if str(checkpoint) == "best":
        path = run.best_checkpoint()
        if path is None:
            raise ConfigError(f"--checkpoint=best: no best_<step>.pt in {run.checkpoints} (the "
                              "run has no val eval yet, or train.best_metric='')")
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"--checkpoint={checkpoint} is not a file (nor best or last)")
    try:
        return rundir.load_checkpoint(path, map_location=device), path
    except Exception as e:  # a truncated or foreign file: one line naming it
        raise ConfigError(f"--checkpoint: {path} is not a readable checkpoint "
                          f"({type(e).__name__}: {_first_line(e)})") from None


def evaluate_run(workdir: str | os.PathLike, split: str = "val",
                 checkpoint: str | os.PathLike | None = None, tag: str = "",
                 batch_size: int | None = None,
                 defaults: ml_collections.ConfigDict | None = None, **eval_settings) -> dict:
    """Restores the run's model, evaluates `split`, writes eval_<split>[_<tag>].json and returns
    the record. checkpoint: "last" (default), "best" or a file. eval_settings: mode, window,
    stride, flip, scales (None: the run's own); batch_size: images per eval batch (default: the
    run's train.eval_batch_size); defaults: the current base config, filling fields added since
    the run was made."""
    run = rundir.RunDir(workdir)
    cfg = run.config(defaults)
    set_eval(cfg, **eval_settings)
    if batch_size is not None:
        cfg.train.eval_batch_size = batch_size
    with config_errors():
        device = runtime.select_device(cfg.train.device, distributed.world_info({}))
    saved, source = restore(run, checkpoint, device)
    exp = experiment.build(cfg, device, pretrained=False)
    if split not in exp.splits:
        raise ConfigError(f"split={split!r}: the dataset has no such split (data.{split}_split="
                          f"{cfg.data.get(split + '_split')!r})")
    state = saved["state"]
    _check_keys(state, exp, source)
    eval_step = experiment.eval_step(cfg, exp.model, exp.loss_fn)
    result = evaluate_split(eval_step, state["params"], state["buffers"], exp.splits[split], cfg,
                            device)
    save_per_image(run, run.eval_file(split, tag).stem, result, exp.splits[split],
                   int(state["step"]), split)
    record = {"step": int(state["step"]), "split": split,
              "checkpoint": str(source), "eval": cfg.eval.to_dict(),
              "class_names": list(exp.info.class_names), **result}
    run.write_eval(record, tag)
    return record


def _check_keys(state: dict, exp: experiment.Experiment, source) -> None:
    """A checkpoint of another model would fail deep inside functional_call: say which."""
    for name, expected in (("params", exp.params), ("buffers", exp.buffers)):
        saved = state[name]
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ConfigError(f"{source} does not hold this config's model ({name} missing: "
                              f"{missing[:3]}, unexpected: {extra[:3]})")


def per_class_table(record: dict) -> str:
    """Markdown: IoU, accuracy and Dice of each class, then the means."""
    lines = ["| class | IoU | acc | Dice |", "|---|---|---|---|"]
    rows = zip(record["class_names"], record["iou_per_class"], record["acc_per_class"],
               record["dice_per_class"])
    for name, *values in rows:
        lines.append(f"| {name} | " + " | ".join(_number(v) for v in values) + " |")
    means = (record["miou"], record["mean_acc"], record["dice_macro"])
    lines.append("| **mean** | " + " | ".join(_number(v) for v in means) + " |")
    return "\n".join(lines)


def report(workdir, record: dict, tag: str = "") -> str:
    """What the evaluate command prints: the headline numbers, the per-class table, the file."""
    e = record["eval"]
    return (f"{workdir}: {record['split']} at step {record['step']}, {e['mode']} (flip "
            f"{e['flip']}, scales {tuple(e['scales'])}): miou {_number(record['miou'])}  "
            f"pixel_acc {_number(record['pixel_acc'])}  loss {_number(record['loss'])}\n"
            f"{per_class_table(record)}\n"
            f"-> {rundir.RunDir(workdir).eval_file(record['split'], tag)}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _number(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"
