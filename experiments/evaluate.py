"""Evaluates a trained run on one split, with whole-image or sliding-window inference and
optional test-time augmentation, and writes <workdir>/eval_<split>[_<tag>].json.

  python experiments/evaluate.py runs/psp --split=test
  python experiments/evaluate.py runs/psp --split=test --mode=slide --window=48,48 --stride=32,32
  python experiments/evaluate.py runs/psp --split=val --flip --scales=0.75,1,1.25 --tag=tta
  python experiments/evaluate.py runs/psp --checkpoint=runs/psp/checkpoints/ckpt_00000500.pt

The model and data come from the run's config.json; the eval settings default to its `eval`
section (configs/common.py) and each flag overrides one of them. The record holds the metrics
of DESIGN.md, the confusion matrix, the eval settings and the checkpoint's step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import ml_collections  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import common  # noqa: E402
from seg import checkpoint, distributed, inference, writers  # noqa: E402
from seg import train as seg_train  # noqa: E402


def define_flags() -> None:
    """Defined when run as a script only: importing this module (tests, notebooks) defines no
    flags, so it never clashes with another script's flags of the same name."""
    flags.DEFINE_enum("split", "val", ["train", "val", "test"], "The split to evaluate.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint file (default: the newest readable "
                        "one in <workdir>/checkpoints).")
    flags.DEFINE_string("tag", "", "Names the record eval_<split>_<tag>.json.")
    flags.DEFINE_enum("mode", None, list(inference.MODES), "eval.mode: whole or slide.")
    flags.DEFINE_list("window", None, "eval.window: H,W of the sliding window.")
    flags.DEFINE_list("stride", None, "eval.stride: h,w between sliding windows.")
    flags.DEFINE_bool("flip", None, "eval.flip: average with the mirrored image.")
    flags.DEFINE_list("scales", None, "eval.scales, e.g. 0.75,1,1.25.")
    flags.DEFINE_integer("batch_size", None, "Images per eval batch (default: the run's "
                         "train.eval_batch_size).")


def _train_script():
    # Imported here, not at the top: importing it defines the required --config and --workdir
    # flags of experiments/train.py, which this command line does not give.
    from experiments import train
    return train


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    """The run's config.json as a ConfigDict: JSON lists back to tuples, and fields added to
    configs/common.py since the run was made filled in with their defaults."""
    path = workdir / "config.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: is {workdir} a run directory?")
    saved = _tuples(json.loads(path.read_text()))
    return ml_collections.ConfigDict(_with_defaults(saved, common.get_base_config().to_dict()))


def _tuples(x):
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _with_defaults(saved: dict, defaults: dict) -> dict:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def set_eval(cfg, mode=None, window=None, stride=None, flip=None, scales=None) -> None:
    """Overrides the config's eval settings with those given (None keeps the run's)."""
    given = {"mode": mode, "flip": flip, "window": _numbers(window, int, "eval.window"),
             "stride": _numbers(stride, int, "eval.stride"),
             "scales": _numbers(scales, float, "eval.scales")}
    for key, value in given.items():
        if value is not None:
            cfg.eval[key] = value
    inference.from_config(cfg.eval)  # a bad value raises here, naming the field


def _numbers(values, kind, field):
    if values is None:
        return None
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ValueError(f"{field}={','.join(map(str, values))} must be {kind.__name__}s") from None


def load_state(workdir: Path, checkpoint_file: Path | None, device) -> dict:
    if checkpoint_file is not None:
        if not checkpoint_file.is_file():
            raise ValueError(f"--checkpoint={checkpoint_file} is not a file")
        return torch.load(checkpoint_file, map_location=device, weights_only=True)
    saved = checkpoint.restore(workdir / "checkpoints", map_location=device)
    if saved is None:
        raise ValueError(f"no readable checkpoint in {workdir / 'checkpoints'}")
    return saved


def record_path(workdir: Path, split: str, tag: str = "") -> Path:
    return workdir / f"eval_{split}{'_' + tag if tag else ''}.json"


def evaluate_run(workdir: Path, split: str = "val", checkpoint_file: Path | None = None,
                 tag: str = "", batch_size: int | None = None, **eval_settings) -> dict:
    """Restores the run's model from its checkpoint, evaluates `split` and writes the record;
    eval_settings: mode, window, stride, flip, scales (None: the run's own)."""
    train = _train_script()
    workdir = Path(workdir)
    cfg = load_config(workdir)
    set_eval(cfg, **eval_settings)
    if batch_size is not None:
        cfg.train.eval_batch_size = batch_size
    device = train.select_device(cfg.train.device, distributed.world_info({}))
    saved = load_state(workdir, checkpoint_file, device)
    splits, model, params, buffers, _, _, loss_fn = train.build(cfg, device)
    state = seg_train.TrainState(**saved["state"])
    _check_keys(state, params, buffers, checkpoint_file or workdir / "checkpoints")
    eval_step = seg_train.make_eval_step(model, loss_fn, cfg.data.num_classes,
                                         ignore_index=cfg.data.ignore_index,
                                         logits_fn=inference.from_config(cfg.eval))
    if split not in splits:
        raise ValueError(f"--split={split}: the dataset has no such split (data.{split}_split="
                         f"{cfg.data.get(split + '_split')!r})")
    info = splits["train"].dataset.info   # every split is normalised with the train stats
    result = train.evaluate(eval_step, state, splits[split], (info.mean, info.std), cfg, device,
                            train.World())
    record = {"step": int(saved["step"]), "split": split,
              "checkpoint": str(checkpoint_file or workdir / "checkpoints"),
              "eval": cfg.eval.to_dict(), "class_names": list(info.class_names), **result}
    writers.write_json(record_path(workdir, split, tag), record)
    return record


def _check_keys(state, params, buffers, source) -> None:
    """A checkpoint of another model would fail deep inside functional_call: say which."""
    for name, saved, expected in (("params", state.params, params),
                                  ("buffers", state.buffers, buffers)):
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ValueError(f"{source} does not hold this config's model ({name} missing: "
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


def _number(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: evaluate.py <workdir> [--split=val|test] [flags]")
    workdir, f = Path(argv[1]), flags.FLAGS
    try:
        record = evaluate_run(workdir, f.split, Path(f.checkpoint) if f.checkpoint else None,
                              f.tag, f.batch_size, mode=f.mode, window=f.window,
                              stride=f.stride, flip=f.flip, scales=f.scales)
    except ValueError as e:  # train.ConfigError included
        sys.exit(f"error: {e}")
    e = record["eval"]
    print(f"{workdir}: {record['split']} at step {record['step']}, {e['mode']} "
          f"(flip {e['flip']}, scales {tuple(e['scales'])}): miou {_number(record['miou'])}  "
          f"pixel_acc {_number(record['pixel_acc'])}  loss {_number(record['loss'])}")
    print(per_class_table(record))
    print(f"-> {record_path(workdir, record['split'], f.tag)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
