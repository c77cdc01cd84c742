"""Trains a segmentation model from a config and writes the run directory of DESIGN.md.

  python experiments/train.py --config=configs/pspnet.py --workdir=runs/psp
  python experiments/train.py --config=configs/unet.py --workdir=runs/unet --config.train.steps=200

Restarting with the same --workdir resumes from the newest checkpoint and ends with the same
numbers as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torchvision  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from seg import runtime  # noqa: E402
from seg import checkpoint, data, functional, losses, models, optim, writers  # noqa: E402
from seg import train as seg_train  # noqa: E402
from seg.data import pipeline  # noqa: E402
from seg.models import weights  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


class ConfigError(ValueError):
    """A bad config value: reported as one line, before any work is done."""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config mistakes reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
        sys.exit(f"error: {message}")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return torch.device(name)


def validate(cfg) -> None:
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
    if t.precision not in seg_train.PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r} is not one of "
                          f"{', '.join(seg_train.PRECISIONS)}")
    if t.checkpoint_activations and (t.compile or t.grad_impl == "func"):
        raise ConfigError("train.checkpoint_activations=True needs train.compile=False and "
                          "train.grad_impl auto or autograd (torch.func.grad cannot checkpoint)")
    if cfg.data.num_classes < 2:
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} must be at least 2")
    if cfg.loss.name in losses.BINARY_LOSSES and cfg.data.num_classes != 2:
        raise ConfigError(f"loss.name={cfg.loss.name!r} is a binary loss but "
                          f"data.num_classes={cfg.data.num_classes} (it needs 2)")
    if cfg.loss.class_weights and len(cfg.loss.class_weights) != cfg.data.num_classes:
        raise ConfigError(f"loss.class_weights has {len(cfg.loss.class_weights)} entries but "
                          f"data.num_classes={cfg.data.num_classes}")


def build(cfg, device: torch.device):
    """config -> (datasets, model definition, params, buffers, optimizer, schedule, loss)."""
    splits = {s: data.build(cfg.data, s) for s in ("train", "val", "test")}
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


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """The run directory's bookkeeping: metrics log, last and best eval, times, summary."""

    def __init__(self, workdir: Path, cfg, device, model_info: dict, class_names):
        self.workdir, self.cfg, self.device = workdir, cfg, device
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
                "environment": environment(self.device)}

    def record_eval(self, step: int, split: str, result: dict) -> dict:
        record = {"step": step, "split": split, **result}
        self.log.write(record)
        self.last[split] = record
        if split == "val" and (self.best is None or _rank(result) > _rank(self.best)):
            self.best = record
        return record


def _rank(record: dict) -> float:
    miou = record["miou"]
    return miou if miou is not None and miou == miou else -math.inf  # NaN/None never wins


def evaluate(eval_step, state, split_data, cfg, device) -> dict:
    batches = pipeline.eval_batches(split_data, cfg.train.eval_batch_size, device=device)
    return seg_train.evaluate(eval_step, state.params, state.buffers, batches)


def main(argv):
    del argv
    try:
        run(_CONFIG.value, Path(_WORKDIR.value))
    except ConfigError as e:
        sys.exit(f"error: {e}")


def run(cfg, workdir: Path) -> dict:
    """Trains (or resumes) one run in `workdir` and returns its summary; the entry point that
    ablation scripts call. Config mistakes raise ConfigError before anything is written."""
    runtime.keep_freed_memory()  # CPU steps re-allocate big tensors; see seg/runtime.py
    try:
        validate(cfg)
        device = select_device(cfg.train.device)
        if (cfg.train.precision == "bf16" and device.type == "cuda"
                and not torch.cuda.is_bf16_supported(including_emulation=False)):
            raise ConfigError(f"train.precision='bf16' but {torch.cuda.get_device_name(device)} "
                              "has no bf16 arithmetic; use fp32")
        splits, model, params, buffers, optimizer, schedule, loss_fn = build(cfg, device)
        workdir.mkdir(parents=True, exist_ok=True)
        check_same_config(workdir, cfg)
    except ValueError as e:  # ConfigError included; library errors name their field
        raise ConfigError(str(e)) from None
    cfg.lock()
    writers.write_json(workdir / "config.json", cfg.to_dict())
    return train(cfg, workdir, device, splits, model, params, buffers, optimizer, schedule,
                 loss_fn)


def train(cfg, workdir, device, splits, model, params, buffers, optimizer, schedule, loss_fn):
    trainable, _ = functional.split_trainable(params, cfg.train.freeze)
    torch.manual_seed(cfg.seed)  # the global RNG drives dropout
    state = seg_train.init_state(params, buffers, optimizer, trainable,
                                 channels_last=cfg.train.channels_last)
    model_info = {"name": cfg.model.name, "params": functional.count(params),
                  "trainable_params": sum(params[k].numel() for k in trainable)}
    run = Run(workdir, cfg, device, model_info, splits["train"].class_names)

    saved = checkpoint.restore(workdir / "checkpoints", map_location=device)
    if saved is not None:
        state = seg_train.TrainState(**saved["state"])
        set_rng_state(saved["rng"])
        run.train_time, run.wall_time = saved["train_time"], saved["wall_time"]
        run.best, run.last = saved["best"], saved["last"]
        print(f"resumed from step {saved['step']} in {workdir}", flush=True)
    start = int(state.step)
    run.log.truncate_after(start)

    train_step = seg_train.make_train_step(
        model, loss_fn, optimizer, schedule, trainable=trainable, frozen_modules=cfg.train.freeze,
        aux_weight=cfg.loss.aux_weight, grad_impl=cfg.train.grad_impl,
        compile=cfg.train.compile, donate=True,  # the loop never reads an old state again
        precision=cfg.train.precision, channels_last=cfg.train.channels_last,
        checkpoint_activations=cfg.train.checkpoint_activations)
    eval_step = seg_train.make_eval_step(model, loss_fn, cfg.data.num_classes,
                                         ignore_index=cfg.data.ignore_index,
                                         compile=cfg.train.compile,
                                         precision=cfg.train.precision,
                                         channels_last=cfg.train.channels_last)
    batches = pipeline.train_batches(splits["train"], cfg.train.batch_size, cfg.seed,
                                     start_step=start, device=device, hflip=cfg.data.hflip)

    steps, t = cfg.train.steps, cfg.train
    clock = Clock(device, run.train_time, run.wall_time)
    # The train loss logged is the mean since the last log line; a resume mid-window continues it.
    loss_sum, window = torch.zeros((), device=device), 0
    if saved is not None:
        loss_sum, window = saved["window"]["loss_sum"], saved["window"]["steps"]
    for step in range(start + 1, steps + 1):
        state, m = train_step(state, next(batches))
        loss_sum += m["loss"]
        window += 1
        if step % t.log_every == 0 or step == steps:
            loss = (loss_sum / window).item()  # the only host sync of the window
            seconds = clock.lap()
            ips, eta = window * t.batch_size / seconds, (steps - step) * seconds / window
            run.log.write({"step": step, "split": "train", "loss": loss, "lr": m["lr"].item(),
                           "images_per_s": ips})
            print(f"step {step}/{steps}  loss {loss:.4f}  lr {m['lr'].item():.3g}  "
                  f"{ips:.1f} img/s  eta {eta:.0f}s", flush=True)
            loss_sum.zero_()
            window = 0
        if step % t.eval_every == 0 or step == steps:
            with clock.paused():
                result = run.record_eval(step, "val", evaluate(eval_step, state, splits["val"],
                                                              cfg, device))
                run.train_time, run.wall_time = clock.train_time(), clock.wall_time()
                writers.write_json(workdir / "summary.json", run.summary(step))
            print(f"step {step}  val miou {result['miou']:.4f}  pixel_acc "
                  f"{result['pixel_acc']:.4f}  loss {result['loss']:.4f}", flush=True)
        if step % t.checkpoint_every == 0 or step == steps:
            with clock.paused():
                run.train_time, run.wall_time = clock.train_time(), clock.wall_time()
                checkpoint.save(workdir / "checkpoints", step, {
                    "step": step, "state": state._asdict(), "rng": rng_state(),
                    "train_time": run.train_time, "wall_time": run.wall_time,
                    "best": run.best, "last": run.last,
                    "window": {"loss_sum": loss_sum, "steps": window}}, keep=t.keep_checkpoints)
                writers.write_json(workdir / "summary.json", run.summary(step))

    result = run.record_eval(steps, "test", evaluate(eval_step, state, splits["test"], cfg,
                                                     device))
    run.wall_time = clock.wall_time()
    writers.write_json(workdir / "summary.json", run.summary(steps))
    print(f"test miou {result['miou']:.4f}  pixel_acc {result['pixel_acc']:.4f}  "
          f"wall {run.wall_time:.0f}s  -> {workdir}", flush=True)
    return run.summary(steps)


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
