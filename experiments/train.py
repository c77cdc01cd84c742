"""Trains a segmentation model from a config and writes the run directory of DESIGN.md.

  python experiments/train.py --config=configs/pspnet.py --workdir=runs/psp
  python experiments/train.py --config=configs/unet.py --workdir=runs/unet --config.train.steps=200

Restarting with the same --workdir resumes from the newest readable checkpoint and ends with the
same numbers as an uninterrupted run. Data parallel over N processes (GPUs, or CPU on gloo):

  torchrun --nproc_per_node=N experiments/train.py --config=... --workdir=...

train.batch_size is then the global batch; rank 0 alone writes files and prints.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torchvision  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from seg import runtime  # noqa: E402
from seg import checkpoint, data, distributed, functional, losses, models  # noqa: E402
from seg import inference, optim, visualize, writers  # noqa: E402
from seg import train as seg_train  # noqa: E402
from seg.data import augment, batches as loader_batches  # noqa: E402
from seg.data.dataset import SegDataset  # noqa: E402
from seg.models import weights  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


_RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout from seed + r * this; rank 0 = one process


class ConfigError(ValueError):
    """A bad config value: reported as one line, before any work is done."""


class NonFiniteError(RuntimeError):
    """The loss or the state went NaN / infinite: reported as one line naming the step."""


class World(NamedTuple):
    """This process's place in a data-parallel job (size 1 and no group for one process)."""
    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def writes(self) -> bool:
        return self.rank == 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config mistakes reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
        sys.exit(f"error: {message}")


def select_device(name: str, info: distributed.WorldInfo) -> torch.device:
    """The device of this rank: with torchrun, GPU number LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    if name.startswith("cuda:") and info.world_size > 1:
        raise ConfigError(f"train.device={name!r} names one GPU for {info.world_size} ranks; "
                          "use 'cuda' or 'auto' (each rank takes GPU LOCAL_RANK)")
    return torch.device(name)


def validate(cfg, world_size: int = 1) -> None:
    """Checks that need no data or model: one line naming the field."""
    t = cfg.train
    for field in ("steps", "batch_size", "eval_batch_size", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints"):
        if t[field] <= 0:
            raise ConfigError(f"train.{field}={t[field]} must be positive")
    if t.grad_impl not in ("auto", "autograd", "func"):
        raise ConfigError(f"train.grad_impl={t.grad_impl!r} is not one of auto, autograd, func")
    if t.compile and t.grad_impl == "autograd":
        raise ConfigError("train.grad_impl='autograd' cannot be compiled as one graph: use "
                          "'auto' or 'func' with train.compile=True")
    if t.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={t.nonfinite!r} is not one of stop, skip")
    if t.batch_size % world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the world size "
                          f"{world_size} (it is the global batch, split over the ranks)")
    if t.eval_batch_size < world_size:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is smaller than the world "
                          f"size {world_size} (it is the global eval batch)")
    if t.precision not in seg_train.PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r} is not one of "
                          f"{', '.join(seg_train.PRECISIONS)}")
    if t.checkpoint_activations and (t.compile or t.grad_impl == "func"):
        raise ConfigError("train.checkpoint_activations=True needs train.compile=False and "
                          "train.grad_impl auto or autograd (torch.func.grad cannot checkpoint)")
    if cfg.data.num_classes < 2:
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} must be at least 2")
    validate_crop(cfg.data)
    if cfg.loss.name in losses.BINARY_LOSSES and cfg.data.num_classes != 2:
        raise ConfigError(f"loss.name={cfg.loss.name!r} is a binary loss but "
                          f"data.num_classes={cfg.data.num_classes} (it needs 2)")
    if cfg.loss.class_weights and len(cfg.loss.class_weights) != cfg.data.num_classes:
        raise ConfigError(f"loss.class_weights has {len(cfg.loss.class_weights)} entries but "
                          f"data.num_classes={cfg.data.num_classes}")
    if t.num_pictures < 0:
        raise ConfigError(f"train.num_pictures={t.num_pictures} must be >= 0")
    if t.tensorboard and not writers.has_tensorboard():
        raise ConfigError("train.tensorboard=True needs the tensorboard package, which is not "
                          "installed (pip install tensorboard)")
    inference.from_config(cfg.eval)  # a bad eval.* value raises here, naming the field


def validate_crop(data_cfg) -> None:
    crop = tuple(data_cfg.crop_size)
    if not crop:
        return
    if len(crop) != 2 or not all(isinstance(c, int) and c > 0 for c in crop):
        raise ConfigError(f"data.crop_size={crop} must be () or two positive ints (H, W)")
    if data_cfg.name != "synthetic":  # image sizes of real data vary: crops are padded
        return
    size = data_cfg.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scale = max(data_cfg.scale_range)
    if crop[0] > h * scale or crop[1] > w * scale:
        raise ConfigError(f"data.crop_size={crop} is larger than the images: data.image_size="
                          f"{size} rescaled by at most {scale} (data.scale_range)")


def build(cfg, device: torch.device):
    """config -> (datasets, model definition, params, buffers, optimizer, schedule, loss)."""
    splits = build_data(cfg.data)
    num_outputs = 1 if cfg.loss.name in losses.BINARY_LOSSES else cfg.data.num_classes
    model, params, buffers = functional.init(lambda: models.build(cfg.model, num_outputs),
                                             seed=cfg.seed, device=device)
    if cfg.model.backbone_weights:
        params, buffers = load_weights(cfg, params, buffers)
    if cfg.train.checkpoint_activations and not any(
            isinstance(m, models.CHECKPOINT_BLOCKS) for m in model.modules()):
        raise ConfigError(f"train.checkpoint_activations=True but model.name="
                          f"{cfg.model.name!r} has no ResNet or UNet block to recompute")
    for prefix in cfg.train.freeze:
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise ConfigError(f"train.freeze names {prefix!r}, which is not a module of "
                              f"model.name={cfg.model.name!r}") from None
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, cfg.train.steps)
    loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
    return splits, model, params, buffers, optimizer, schedule, loss_fn


def build_data(data_cfg) -> dict:
    """{"train", "val"[, "test"]: Split(dataset, transform)}; no test split when
    data.test_split is ""."""
    for field in ("train_split", "val_split"):
        if not data_cfg[field]:
            raise ConfigError(f"data.{field} is empty: training needs it")
    splits = {}
    for role in ("train", "val", "test"):
        if data_cfg[f"{role}_split"]:   # data.build reads the dataset's split named there
            dataset = data.build(data_cfg, role)
            make = augment.train_transform if role == "train" else augment.eval_transform
            splits[role] = Split(dataset, make(data_cfg, dataset.info))
    info = splits["train"].dataset.info
    if info.num_classes != data_cfg.num_classes:
        raise ConfigError(f"data.num_classes={data_cfg.num_classes} but the {data_cfg.name} "
                          f"dataset has {info.num_classes} classes ({', '.join(info.class_names)})")
    return splits


class Split(NamedTuple):
    dataset: SegDataset
    transform: Callable | None


def load_weights(cfg, params, buffers):
    """model.backbone_weights -> params/buffers with the encoder ("backbone.") replaced."""
    arch = cfg.model.get("backbone")
    if arch is None:
        raise ConfigError(f"model.backbone_weights={cfg.model.backbone_weights!r} but "
                          f"model.name={cfg.model.name!r} has no pretrained backbone")
    try:
        return weights.apply_backbone(params, buffers,
                                      weights.load_backbone(cfg.model.backbone_weights, arch))
    except (OSError, ValueError) as e:  # a missing file is an OSError
        raise ConfigError(str(e)) from None


def check_same_config(workdir: Path, cfg) -> None:
    """A workdir belongs to one config: resuming under another would mix two runs."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), writers.to_jsonable(cfg.to_dict())
    diff = sorted(_flat_diff(old, new))
    if diff:
        raise ConfigError(f"{workdir} holds a run with another config (differs in: "
                          f"{', '.join(diff)}); use a new --workdir")


def _flat_diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _flat_diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def environment(device: torch.device, world_size: int) -> dict:
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "world_size": world_size}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def rng_states(device: torch.device, world: World) -> list[dict]:
    """The dropout RNG states of every rank (a collective: all ranks call it)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return distributed.gather_objects(state, world.group) if world.size > 1 else [state]


def set_rng_state(states: list[dict], device: torch.device, world: World, step: int) -> None:
    if len(states) != world.size:
        warnings.warn(f"the checkpoint of step {step} was written by {len(states)} rank(s), this "
                      f"run has {world.size}: dropout draws restart from the seed, so the run "
                      "will not match an uninterrupted one")
        return
    state = states[world.rank]
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Run:
    """The run directory's bookkeeping: metrics log, last and best eval, times, summary.
    Every rank keeps it; rank 0 alone writes it."""

    def __init__(self, workdir: Path, cfg, device, model_info: dict, class_names, world: World):
        self.workdir, self.cfg, self.device, self.world = workdir, cfg, device, world
        self.log = writers.MetricsLog(workdir / "metrics.jsonl")
        self.model_info, self.class_names = model_info, list(class_names)
        self.train_time = 0.0      # seconds spent in train steps (eval excluded), over all restarts
        self.wall_time = 0.0       # seconds of the whole run, over all restarts
        self.best = None
        self.last = {}

    def summary(self, step: int) -> dict:
        images = step * self.cfg.train.batch_size
        return {"model": self.model_info, "steps": step, "wall_time_s": self.wall_time,
                "train_time_s": self.train_time,
                "images_per_s": images / self.train_time if self.train_time else None,
                "class_names": self.class_names, "last_eval": self.last, "best_eval": self.best,
                # the last evals' per-class IoU keyed by the dataset's class names
                "iou_by_class": {split: dict(zip(self.class_names, r["iou_per_class"]))
                                 for split, r in self.last.items()},
                "environment": environment(self.device, self.world.size)}

    def write(self, record: dict) -> None:
        if self.world.writes:
            self.log.write(record)

    def write_summary(self, step: int) -> None:
        if self.world.writes:
            writers.write_json(self.workdir / "summary.json", self.summary(step))

    def record_eval(self, step: int, split: str, result: dict) -> dict:
        record = {"step": step, "split": split, **result}
        self.write(record)
        self.last[split] = record
        if split == "val" and (self.best is None or _rank(result) > _rank(self.best)):
            self.best = record
        return record


def _rank(record: dict) -> float:
    miou = record["miou"]
    return miou if miou is not None and miou == miou else -math.inf  # NaN/None never wins


def evaluate(eval_step, state, split: Split, stats, cfg, device, world: World) -> dict:
    """The metrics of a whole split, normalised with the train split's stats; with several
    ranks each runs its shard and the confusion matrices are summed, so the numbers are the
    single-process ones."""
    d = cfg.data
    batches = loader_batches.eval_batches(split.dataset, split.transform, cfg.train.eval_batch_size,
                                  device=device, workers=d.workers, pad_multiple=d.pad_multiple,
                                  rank=world.rank, world_size=world.size,
                                  mean=stats[0], std=stats[1], prefetch=d.prefetch)
    reduce = functools.partial(distributed.sum_across, group=world.group) if world.size > 1 \
        else None
    return seg_train.evaluate(eval_step, state.params, state.buffers, batches, reduce=reduce)


def picture_batch(split: Split, stats, cfg, device):
    """The first train.num_pictures images of the split: the same ones at every eval."""
    n = min(cfg.train.num_pictures, len(split.dataset))
    if n == 0:
        return None
    return next(loader_batches.eval_batches(split.dataset, split.transform, n, device=device,
                                    pad_multiple=cfg.data.pad_multiple, mean=stats[0],
                                    std=stats[1]))


def write_pictures(run, step, model, state, batch, logits_fn, info, stats) -> None:
    """predictions/step_<step>.png: rows of image | ground truth | prediction."""
    images, masks = batch
    preds = inference.predict_labels(model, state.params, state.buffers, images, logits_fn)
    palette = visualize.palette_tensor(info.palette, run.cfg.data.num_classes)
    picture = visualize.prediction_grid(visualize.unnormalize(images, *stats), masks,
                                        preds, palette, run.cfg.data.ignore_index).cpu()
    path = run.workdir / "predictions" / f"step_{step:08d}.png"
    path.parent.mkdir(exist_ok=True)
    torchvision.io.write_png(picture, str(path))
    if run.log.tensorboard is not None:
        run.log.tensorboard.add_image("val/predictions", picture, step)


def finished_summary(workdir: Path, cfg) -> dict | None:
    """The summary of a run that has done all its steps and its final test eval (when the
    dataset has a test split), else None."""
    steps, path = cfg.train.steps, workdir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    last = summary.get("last_eval") or {}
    final = last.get("test" if cfg.data.test_split else "val") or {}
    return summary if summary.get("steps") == steps and final.get("step") == steps else None


def main(argv):
    del argv
    # warnings (an unreadable checkpoint skipped, ...) as one line each, like the errors
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        run(_CONFIG.value, Path(_WORKDIR.value))
    except (ConfigError, NonFiniteError) as e:
        # Every rank meets the same error: rank 0's line is the whole report.
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)


def run(cfg, workdir: Path) -> dict:
    """Trains (or resumes) one run in `workdir` and returns its summary; the entry point that
    ablation scripts call. Config mistakes raise ConfigError before anything is written.
    Under torchrun it joins the job's process group (or uses the caller's, if initialised)."""
    runtime.keep_freed_memory()  # CPU steps re-allocate big tensors; see seg/runtime.py
    try:
        info = distributed.world_info(os.environ)
        validate(cfg, info.world_size)
        device = select_device(cfg.train.device, info)
        if (cfg.train.precision == "bf16" and device.type == "cuda"
                and not torch.cuda.is_bf16_supported(including_emulation=False)):
            raise ConfigError(f"train.precision='bf16' but {torch.cuda.get_device_name(device)} "
                              "has no bf16 arithmetic; use fp32")
    except ValueError as e:  # ConfigError included
        raise ConfigError(str(e)) from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(runtime.deterministic_algorithms(cfg.train.deterministic))
        if info.rank != 0:  # rank 0 alone prints and warns
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
                open(os.devnull, "w"))))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            splits, model, params, buffers, optimizer, schedule, loss_fn = build(cfg, device)
            check_same_config(workdir, cfg)
        except ValueError as e:  # library errors name their field
            raise ConfigError(str(e)) from None
        cfg.lock()
        world = World(info.rank, info.world_size,
                      stack.enter_context(distributed.process_group(info, device)))
        if world.writes:
            workdir.mkdir(parents=True, exist_ok=True)
            writers.write_json(workdir / "config.json", cfg.to_dict())
        return train(cfg, workdir, device, splits, model, params, buffers, optimizer, schedule,
                     loss_fn, world)


def train(cfg, workdir, device, splits, model, params, buffers, optimizer, schedule, loss_fn,
          world: World):
    trainable, _ = functional.split_trainable(params, cfg.train.freeze)
    # The global RNG drives dropout: each rank draws its own masks.
    torch.manual_seed(cfg.seed + _RANK_SEED_STRIDE * world.rank)
    state = seg_train.init_state(params, buffers, optimizer, trainable,
                                 channels_last=cfg.train.channels_last)
    model_info = {"name": cfg.model.name, "params": functional.count(params),
                  "trainable_params": sum(params[k].numel() for k in trainable)}
    info = splits["train"].dataset.info
    stats = (info.mean, info.std)
    run = Run(workdir, cfg, device, model_info, info.class_names, world)

    saved = checkpoint.restore(workdir / "checkpoints", map_location=device)
    start = 0
    if saved is not None:
        state = seg_train.TrainState(**saved["state"])
        set_rng_state(saved["rng"], device, world, saved["step"])
        run.train_time, run.wall_time = saved["train_time"], saved["wall_time"]
        run.best, run.last = saved["best"], saved["last"]
        start = saved["data"]["step"]
        print(f"resumed from step {saved['step']} in {workdir}", flush=True)
        finished = saved["step"] == cfg.train.steps and finished_summary(workdir, cfg)
        if finished:  # nothing left to do: no second test eval, no duplicate record
            print(f"{workdir} has finished its {cfg.train.steps} steps and evals", flush=True)
            return finished
    if world.writes:  # the test evaluation follows the last checkpoint: always redone
        run.log.truncate_after(start, redo_splits=("test",))
        if cfg.train.tensorboard:
            run.log.tensorboard = writers.tensorboard_writer(workdir / "tensorboard", start + 1)

    if world.size > 1 and cfg.train.sync_bn:
        distributed.convert_sync_batchnorm(model, world.group)
    train_step = seg_train.make_train_step(
        model, loss_fn, optimizer, schedule, trainable=trainable, frozen_modules=cfg.train.freeze,
        aux_weight=cfg.loss.aux_weight, grad_impl=cfg.train.grad_impl,
        compile=cfg.train.compile, donate=True,  # the loop never reads an old state again
        grad_reduce=distributed.make_grad_reduce(world.group) if world.size > 1 else None,
        skip_nonfinite=cfg.train.nonfinite == "skip", precision=cfg.train.precision,
        channels_last=cfg.train.channels_last,
        checkpoint_activations=cfg.train.checkpoint_activations)
    logits_fn = inference.from_config(cfg.eval)
    eval_step = seg_train.make_eval_step(model, loss_fn, cfg.data.num_classes,
                                         ignore_index=cfg.data.ignore_index,
                                         compile=cfg.train.compile, logits_fn=logits_fn,
                                         precision=cfg.train.precision,
                                         channels_last=cfg.train.channels_last)
    pictures = picture_batch(splits["val"], stats, cfg, device) if world.writes else None
    # Batches are a pure function of the global step: the data position is that step.
    batches = loader_batches.train_batches(*splits["train"], cfg.train.batch_size, cfg.seed,
                                   start_step=start, device=device, workers=cfg.data.workers,
                                   prefetch=cfg.data.prefetch, rank=world.rank,
                                   world_size=world.size)

    steps, t = cfg.train.steps, cfg.train
    clock = Clock(device, run.train_time, run.wall_time)
    # The train loss logged is the mean since the last log line over the steps whose loss was
    # finite; a resume mid-window continues it.
    window = Window(device, saved["window"] if saved is not None else None)
    for step in range(start + 1, steps + 1):
        state, m = train_step(state, next(batches))
        window.add(state.step, m)
        log_now = step % t.log_every == 0 or step == steps
        eval_now = step % t.eval_every == 0 or step == steps
        save_now = step % t.checkpoint_every == 0 or step == steps
        if not (log_now or eval_now or save_now):
            continue
        if t.nonfinite == "stop" and window.first_bad_step():  # a sync, where the loop syncs
            raise nonfinite_error("loss", window.first_bad_step(), workdir, t.nonfinite)
        if (eval_now or save_now) and not all_finite(state):
            # a finite loss can still give an infinite update: never evaluate or save that
            raise nonfinite_error("parameters or optimizer state", step, workdir, t.nonfinite)
        if world.size > 1 and not t.sync_bn and (eval_now or save_now):
            # per-rank BN statistics drift apart: evaluate and save their average
            state = state._replace(buffers=distributed.average_buffers(state.buffers,
                                                                       world.group))
        if log_now:
            loss, skipped = window.read()  # the only host sync of the window
            seconds = clock.lap()
            ips = window.steps * t.batch_size / seconds
            eta = (steps - step) * seconds / window.steps
            record = {"step": step, "split": "train", "loss": loss, "lr": m["lr"].item(),
                      "images_per_s": ips}
            if t.nonfinite == "skip":
                record["skipped"] = skipped
            run.write(record)
            print(f"step {step}/{steps}  loss {loss:.4f}  lr {m['lr'].item():.3g}  "
                  f"{ips:.1f} img/s  eta {eta:.0f}s" + (f"  skipped {skipped}" if skipped else ""),
                  flush=True)
            window.reset()
        if eval_now:
            with clock.paused():
                result = run.record_eval(step, "val", evaluate(eval_step, state, splits["val"],
                                                              stats, cfg, device, world))
                run.train_time, run.wall_time = clock.train_time(), clock.wall_time()
                run.write_summary(step)
                if pictures is not None:
                    write_pictures(run, step, model, state, pictures, logits_fn, info, stats)
            print(f"step {step}  val miou {result['miou']:.4f}  pixel_acc "
                  f"{result['pixel_acc']:.4f}  loss {result['loss']:.4f}", flush=True)
        if save_now:
            with clock.paused():
                run.train_time, run.wall_time = clock.train_time(), clock.wall_time()
                save_checkpoint(run, state, step, window, world)

    del batches   # stops the loader's workers before the test split is read
    if "test" in splits:
        result = run.record_eval(steps, "test", evaluate(eval_step, state, splits["test"], stats,
                                                         cfg, device, world))
        print(f"test miou {result['miou']:.4f}  pixel_acc {result['pixel_acc']:.4f}", flush=True)
    run.wall_time = clock.wall_time()
    run.write_summary(steps)
    run.log.close()
    print(f"wall {run.wall_time:.0f}s  -> {workdir}", flush=True)
    return run.summary(steps)


def save_checkpoint(run: Run, state, step: int, window: Window, world: World) -> None:
    """Everything an exact resume needs: the train state, every rank's RNG, the data position,
    the log window, times and best/last evals."""
    rngs = rng_states(run.device, world)  # a collective: before the rank-0-only part
    if not world.writes:
        return
    checkpoint.save(run.workdir / "checkpoints", step, {
        "step": step, "state": state._asdict(), "rng": rngs, "data": {"step": step},
        "train_time": run.train_time, "wall_time": run.wall_time,
        "best": run.best, "last": run.last, "window": window.state()},
        keep=run.cfg.train.keep_checkpoints)
    run.write_summary(step)


def all_finite(state) -> bool:
    """Whether every floating-point tensor of the train state is finite: one sync."""
    tree = (state.params, state.buffers, state.opt_state)
    flags = [torch.isfinite(t).all() for t in _leaves(tree) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (dict, list, tuple)):
        for x in (tree.values() if isinstance(tree, dict) else tree):
            yield from _leaves(x)


def nonfinite_error(what: str, step: int, workdir: Path, mode: str) -> NonFiniteError:
    last = checkpoint.latest(workdir / "checkpoints")
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
    return NonFiniteError(f"non-finite {what} at step {step} (train.nonfinite={mode!r}); {kept}")


class Window:
    """The train log window between two log lines, on the device: the sum of the finite losses,
    the number of non-finite (skipped) steps, and the first step whose loss was not finite."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = 0
        self._first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: none
        if saved is not None:
            self.loss_sum, self.skipped, self.steps = (saved["loss_sum"], saved["skipped"],
                                                       saved["steps"])

    def add(self, step: torch.Tensor, metrics: dict) -> None:
        finite = metrics["finite"]
        self.loss_sum += torch.where(finite, metrics["loss"], 0.0)
        self.skipped += ~finite
        self._first_bad = torch.where(~finite & (self._first_bad == 0), step, self._first_bad)
        self.steps += 1

    def first_bad_step(self) -> int:
        return int(self._first_bad)

    def read(self) -> tuple[float, int]:
        """(mean finite loss, NaN if none; skipped steps) in one host sync."""
        loss_sum, skipped = torch.stack([self.loss_sum, self.skipped.to(self.loss_sum.dtype)]
                                        ).tolist()
        good = self.steps - int(skipped)
        return (loss_sum / good if good else math.nan), int(skipped)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.skipped.zero_()
        self.steps = 0

    def state(self) -> dict:
        return {"loss_sum": self.loss_sum, "skipped": self.skipped, "steps": self.steps}


class Clock:
    """Train time and wall time, carried over restarts; eval and checkpoint time is paused out
    of the train time so that images/s measures training alone."""

    def __init__(self, device: torch.device, train_time: float = 0.0, wall_time: float = 0.0):
        self.device = device
        self._train = train_time
        self._wall0 = time.perf_counter() - wall_time
        self._lap0 = time.perf_counter()
        self._paused_in_lap = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued steps belong to the train time

    def lap(self) -> float:
        """Train seconds since the last lap (the caller has just synchronised)."""
        now = time.perf_counter()
        seconds = now - self._lap0 - self._paused_in_lap
        self._train += seconds
        self._lap0, self._paused_in_lap = now, 0.0
        return seconds

    @contextlib.contextmanager
    def paused(self):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused_in_lap += time.perf_counter() - t0

    def train_time(self) -> float:
        return self._train + (time.perf_counter() - self._lap0 - self._paused_in_lap)

    def wall_time(self) -> float:
        return time.perf_counter() - self._wall0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
