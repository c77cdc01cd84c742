"""train_and_evaluate(config, workdir) -> summary: the training loop, importable, no flags.

Restarting with the same workdir resumes from the newest readable checkpoint and ends with the
numbers of an uninterrupted run. Under torchrun (environment variables RANK, WORLD_SIZE,
LOCAL_RANK) every process runs this function: each trains on its slice of the global batch,
and rank 0 alone writes files and prints.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch.utils._pytree import tree_leaves

from seg import amp, distributed, evaluation, experiment, functional, metrics, runtime
from seg import tracking, visualize, writers
from seg import train as steps
from seg.data import Split, batches
from seg.distributed import World
from seg.errors import NonFiniteError, config_errors
from seg.rundir import RunDir
from seg.tracking import Clock, DropoutRng, EvalHistory, LogWindow
from seg.writers import Writer

_POSITIVE = ("steps", "batch_size", "eval_batch_size", "log_every", "eval_every",
             "checkpoint_every", "keep_checkpoints", "num_seeds")


def train_and_evaluate(cfg, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes, or reads back when finished) the run of `cfg` in `workdir` and
    returns its summary. A mistake in the config or the data raises ConfigError / DataError
    before anything is written. Joins the torchrun job's process group (or uses the caller's,
    if one is initialised)."""
    runtime.keep_freed_memory()  # CPU steps re-allocate big tensors; see seg/runtime.py
    run = RunDir(workdir)
    with config_errors():
        info = distributed.world_info(os.environ)
        device = runtime.select_device(cfg.train.device, info)
        check_train(cfg, info.world_size, device)
    experiment.check(cfg)  # the model, loss, optimizer and steps, before any data is read
    with contextlib.ExitStack() as stack:
        stack.enter_context(runtime.deterministic_algorithms(cfg.train.deterministic))
        stack.enter_context(runtime.cudnn_autotuning(not cfg.train.deterministic))
        if info.rank != 0:
            stack.enter_context(_silenced())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        exp = experiment.build(cfg, device)
        changed = run.check_usable(cfg)
        world = World(info.rank, info.world_size,
                      stack.enter_context(distributed.process_group(info, device)))
        writer = Writer(run, exp.info.class_names, enabled=world.writes,
                        tensorboard=cfg.train.tensorboard)
        cfg.lock()
        for c in changed:
            writer.print(f"changed on resume: {c}")
        for line in exp.init_report.lines() if exp.init_report else ():
            writer.print(line)
        if cfg.train.num_seeds > 1:  # members in <workdir>/seed<s>/, each written as a run
            from seg import seeds_loop  # it builds on _Loop
            return seeds_loop.SeedsLoop(cfg, run, exp, device, world, writer).run()
        if world.writes:
            run.write_config(cfg)
            run.write_inference(experiment.inference_meta(cfg, exp.info))
        return _Loop(cfg, run, exp, device, world, writer).run()


def check_train(cfg, world_size: int, device: torch.device) -> None:
    """The train.* values the loop itself relies on (the steps check the rest)."""
    t = cfg.train
    for field in _POSITIVE:
        if t[field] <= 0:
            raise ValueError(f"train.{field}={t[field]} must be positive")
    if t.num_seeds > 1 and world_size > 1:
        raise ValueError(f"train.num_seeds={t.num_seeds} trains its members in one process; "
                         f"under torchrun (world size {world_size}) run the seeds as separate "
                         "jobs")
    if t.batch_size % world_size:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the world size "
                         f"{world_size} (it is the global batch, split over the ranks)")
    evaluation.eval_batch_per_rank(t.eval_batch_size, world_size)
    if t.num_pictures < 0:
        raise ValueError(f"train.num_pictures={t.num_pictures} must be >= 0")
    if t.grad_bucket_mb < 0:
        raise ValueError(f"train.grad_bucket_mb={t.grad_bucket_mb} must be >= 0")
    if t.precision == "fp16" and not amp.autocast_supported(device.type):
        raise ValueError(f"train.precision='fp16' but this torch ({torch.__version__}) has no "
                         f"float16 autocast on {device.type}; use fp32 or bf16")
    if (t.precision == "bf16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise ValueError(f"train.precision='bf16' but {torch.cuda.get_device_name(device)} "
                         "has no bf16 arithmetic; use fp32")


@contextlib.contextmanager
def _silenced():
    """Ranks other than 0 print nothing and warn nothing: rank 0's output is the job's."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Loop:
    """One run of the loop: the state it carries and the work at log, eval and save steps."""

    def __init__(self, cfg, run: RunDir, exp: experiment.Experiment, device: torch.device,
                 world: World, writer: Writer):
        if world.size > 1 and cfg.train.sync_bn:
            distributed.convert_sync_batchnorm(exp.model, world.group)
        grad_reduce = (distributed.grad_reducer(world.group, cfg.train.grad_bucket_mb)
                       if world.size > 1 else None)
        self.train_step, optimizer, trainable = experiment.train_step(
            cfg, exp.model, exp.loss_fn, grad_reduce)
        self._setup(cfg, run, exp, device, world, writer, trainable,
                    experiment.eval_step(cfg, exp.model, exp.loss_fn),
                    experiment.infer(cfg, exp.model))
        self.state = steps.init_state(exp.params, exp.buffers, optimizer, trainable,
                                      channels_last=cfg.train.channels_last,
                                      loss_scale=experiment.loss_scale(cfg))
        self.rng = DropoutRng(cfg.seed, device, world.rank, world.size, world.group)

    def _setup(self, cfg, run: RunDir, exp: experiment.Experiment, device: torch.device,
               world: World, writer: Writer, trainable, eval_step, infer) -> None:
        """What a run keeps besides its train state and dropout RNG: its directory, output,
        evaluation and helpers (each member of a train.num_seeds run has its own:
        seg/seeds_loop.py)."""
        self.cfg, self.rundir, self.exp, self.device, self.world = cfg, run, exp, device, world
        self.writer, self.eval_step, self.infer = writer, eval_step, infer
        self.model_info = {"name": cfg.model.name, "params": functional.count(exp.params),
                           "trainable_params": sum(exp.params[k].numel() for k in trainable)}
        if exp.init_report is not None:
            self.model_info["init_from"] = exp.init_report.to_json()
        self.window, self.clock = LogWindow(device), Clock(device)
        self.evals = EvalHistory(cfg.train.best_metric or "miou")
        self._saved_clock = None
        self._checkpointed_best: int | None = None   # the best step the newest checkpoint knows

    # ------------------------------------------------------------------ resume

    def _resume(self) -> int:
        """Loads the newest checkpoint into the state and the helpers; the step to go on from."""
        saved = self.rundir.restore_checkpoint(map_location=self.device)
        return 0 if saved is None else self._restore(saved)

    def _restore(self, saved: dict) -> int:
        """Loads a checkpoint's payload into the state and the helpers; its step."""
        self.state = steps.TrainState(**saved["state"])
        for name in ("window", "evals", "rng"):
            getattr(self, name).load_state_dict(saved[name])
        self._saved_clock = saved["clock"]  # loaded when the loop starts: setup is not timed
        step = int(self.state.step)
        self._checkpointed_best = self._best_step()
        if self.world.writes:  # best weights of the interrupted run's steps after this one go
            self.rundir.prune_best(keep=(self._checkpointed_best,))
        self.writer.print(f"resumed from step {step} in {self.rundir.path}")
        return step

    def _best_step(self) -> int | None:
        return self.evals.best["step"] if self.evals.best else None

    def _save(self, step: int) -> None:
        """A checkpoint holds everything an exact resume needs, each piece saved by its owner;
        the step is the train state's."""
        payload = {"state": self.state._asdict(), "window": self.window.state_dict(),
                   "clock": self.clock.state_dict(), "evals": self.evals.state_dict(),
                   "rng": self.rng.state_dict()}  # a collective: every rank gathers
        if self.world.writes:
            self.rundir.save_checkpoint(step, payload, keep=self.cfg.train.keep_checkpoints)
            self._checkpointed_best = self._best_step()
            self.rundir.prune_best(keep=(self._checkpointed_best,))
            self.writer.summary(self.summary(step))

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        start = self._resume()
        if start == t.steps and (finished := self.rundir.finished(cfg)) is not None:
            self.writer.print(f"{self.rundir.path} has finished its {t.steps} steps and evals")
            return finished  # nothing left to do: no second test eval, no duplicate record
        if self.world.writes:  # the test evaluation follows the last checkpoint: always redone
            self.rundir.log.truncate_after(start, redo_splits=("test",))
        self.writer.start(start)
        pictures = self._picture_batches() if self.world.writes else None
        train = self.exp.splits["train"]
        # Batches are a pure function of the global step: the data position is the step.
        stream = batches.train_batches(
            train.dataset, train.transform, t.batch_size, cfg.seed, start_step=start,
            device=self.device, workers=cfg.data.workers, prefetch=cfg.data.prefetch,
            rank=self.world.rank, world_size=self.world.size)
        self.writer.print(writers.startup_line(self._startup_info(start)))
        self.clock = Clock(self.device)
        if self._saved_clock is not None:
            self.clock.load_state_dict(self._saved_clock)
        for step in range(start + 1, t.steps + 1):
            self.state, m = self.train_step(self.state, self.clock.next_batch(stream))
            self.window.add(self.state.step, m)
            log_now, eval_now, save_now = due(t, step)
            if step == start + 1 and not log_now:  # compilation, autotuning: say how long
                self.writer.print(writers.first_step_line(step, self.clock.lap(sync=True),
                                                          t.compile))
            if log_now or eval_now or save_now:
                self._check_finite(step, eval_now or save_now)
            if log_now:
                self._log(step)
            if eval_now:
                with self.clock.paused("eval"):
                    self._evaluate(step, "val")
                    self.writer.summary(self.summary(step))
                    if pictures:
                        self._draw(step, pictures)
            if save_now:
                with self.clock.paused("checkpoint"):
                    self._save(step)
        del stream  # stops the loader's workers before the test split is read
        if "test" in self.exp.splits:
            with self.clock.paused("test"):  # not train time
                self._evaluate(t.steps, "test")
        summary = self.summary(t.steps)
        self.writer.summary(summary)
        self.writer.close()
        self.writer.print(f"wall {summary['wall_time_s']:.0f}s  -> {self.rundir.path}")
        return summary

    def _check_finite(self, step: int, keeps_state: bool) -> None:
        """Stops on a non-finite loss (train.nonfinite='stop'); never evaluates or saves a
        non-finite state. With several ranks, averages per-rank BatchNorm statistics before
        they are evaluated or saved."""
        t = self.cfg.train
        if t.nonfinite == "stop" and self.window.first_bad_step():  # a sync, where we sync
            raise self._nonfinite("loss", self.window.first_bad_step())
        if keeps_state and not all_finite(self.state):
            # a finite loss can still give an infinite update
            raise self._nonfinite("parameters or optimizer state", step)
        if keeps_state and self.world.size > 1 and not t.sync_bn:
            self.state = self.state._replace(
                buffers=distributed.average_buffers(self.state.buffers, self.world.group))

    def _nonfinite(self, what: str, step: int) -> NonFiniteError:
        last = self.rundir.latest_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        return NonFiniteError(f"non-finite {what} at step {step} (train.nonfinite="
                              f"{self.cfg.train.nonfinite!r}); {kept}")

    def _log(self, step: int) -> None:
        t, window = self.cfg.train, self.window
        values = window.read()  # the window's one host sync
        lap = self.clock.lap()
        step_s = lap.seconds / lap.steps
        record = {"step": step, "split": "train", **{k: values[k] for k in window.keys},
                  "lr": values["lr"], "images_per_s": t.batch_size / step_s,
                  "step_s": step_s, "data_s": lap.data_wait / lap.steps}
        if (memory := tracking.peak_memory_gib(self.device)) is not None:
            record["peak_mem_gib"] = memory
        if t.precision == "fp16":
            record.update(loss_scale=values["loss_scale"], overflows=values["overflows"])
        if t.nonfinite == "skip":
            record["skipped"] = values["skipped"]
        splits = self.exp.splits
        eta, measured = tracking.remaining_seconds(
            step, t.steps, step_s, self.clock, eval_every=t.eval_every,
            checkpoint_every=t.checkpoint_every,
            test_fraction=len(splits["test"].dataset) / len(splits["val"].dataset)
            if "test" in splits else 0.0)
        self.writer.record(record, steps=t.steps, eta_s=eta, eta_measured=measured)
        window.reset()

    def _startup_info(self, start: int) -> dict:
        t, splits = self.cfg.train, self.exp.splits
        return {"device": runtime.device_name(self.device), "ranks": self.world.size,
                "model": self.cfg.model.name, **self.model_info,
                "images": {name: len(split.dataset) for name, split in splits.items()},
                "batch_size": t.batch_size,
                "steps_per_epoch": len(splits["train"].dataset) // t.batch_size,
                "start": start, "steps": t.steps, "precision": t.precision,
                "compile": t.compile, "channels_last": t.channels_last}

    def _evaluate(self, step: int, split: str) -> None:
        data = self.exp.splits[split]
        result = evaluation.evaluate_split(self.eval_step, self.state.params,
                                           self.state.buffers, data, self.cfg, self.device,
                                           self.world)
        if self.world.writes:  # the latest eval of each split, for paired comparisons
            evaluation.save_per_image(self.rundir, split, result, data, step, split)
        result.pop("per_image", None)
        record = {"step": step, "split": split, **result}
        if self.evals.add(record) and self.cfg.train.best_metric and self.world.writes:
            self._save_best(step, record)
        self.writer.record(record)

    def _save_best(self, step: int, record: dict) -> None:
        """checkpoints/best_<step>.pt: the weights of the new best val eval, no optimizer state.
        The previous best file stays until the next checkpoint, whose eval history names this
        one: a run resumed from the checkpoint before finds its own best weights there."""
        key = self.cfg.train.best_metric
        state = {"step": self.state.step, "params": self.state.params,
                 "buffers": self.state.buffers}
        self.rundir.save_best(step, {"state": state, "best": {"metric": key, key: record[key]}},
                              keep_step=self._checkpointed_best)

    # ------------------------------------------------------------------ pictures

    def _picture_batches(self) -> list | None:
        """The first train.num_pictures val images: the same ones at every eval."""
        val: Split = self.exp.splits["val"]
        n = min(self.cfg.train.num_pictures, len(val.dataset))
        if n == 0:
            return None
        picked, count = [], 0
        for images, masks in batches.eval_batches(  # reads the first n, in groups of a size
                val.dataset, val.transform, n, device=self.device, prefetch=0,
                pad_multiple=self.cfg.data.pad_multiple):
            picked.append((images, masks))
            count += images.shape[0]
            if count >= n:
                return picked
        return picked

    def _draw(self, step: int, pictures: list) -> None:
        """predictions/step_<step>.png: rows of image | ground truth | prediction, titled, with
        a legend (seg.visualize.prediction_picture)."""
        info, shown, masks, preds = self.exp.info, [], [], []
        palette = visualize.palette_tensor(info.palette, self.cfg.data.num_classes)
        for images, batch_masks in pictures:
            logits = self.infer(self.state.params, self.state.buffers, images)
            shown += visualize.unnormalize(images, info.mean, info.std)  # one per sample
            masks += batch_masks
            preds += metrics.predict(logits)
        picture = visualize.prediction_picture(shown, masks, preds, palette, info.class_names,
                                               self.cfg.data.ignore_index)
        self.writer.picture(step, picture.pixels)

    # ------------------------------------------------------------------ summary

    def summary(self, step: int) -> dict:
        train_time = self.clock.train_time()
        images = step * self.cfg.train.batch_size
        last, names = self.evals.last, list(self.exp.info.class_names)
        return {"model": self.model_info, "steps": step, "wall_time_s": self.clock.wall_time(),
                "train_time_s": train_time,
                "images_per_s": images / train_time if train_time else None,
                "class_names": names, "class_weights": self.exp.class_weights,
                "last_eval": last, "best_eval": self.evals.best,
                # the last evals' per-class IoU keyed by the dataset's class names
                "iou_by_class": {split: dict(zip(names, r["iou_per_class"]))
                                 for split, r in last.items()},
                "environment": runtime.environment(self.device, self.world.size)}


def due(t, step: int) -> tuple[bool, bool, bool]:
    """Whether `step` logs, evaluates, checkpoints (config.train `t`); the last step does all."""
    last = step == t.steps
    return (step % t.log_every == 0 or last, step % t.eval_every == 0 or last,
            step % t.checkpoint_every == 0 or last)


def all_finite(state: steps.TrainState) -> bool:
    """Whether every floating-point tensor of the train state is finite: one host sync."""
    leaves = tree_leaves((state.params, state.buffers, state.opt_state))
    flags = [torch.isfinite(t).all() for t in leaves
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
