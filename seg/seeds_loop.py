"""The loop of a train.num_seeds=K run: K members trained by one vmapped step (seg/seeds.py),
each written as an ordinary run directory <workdir>/seed<s>/ (its config with its own seed and
num_seeds=1, metrics, summary, checkpoints, best weights, pictures, per-image results), so that
evaluate, predict, report and the sweeps read a member exactly as a separate run.

Each member is a seg.loop._Loop without a train step: its log window, clock, eval history,
dropout stream (seeds.SeedRng), writer and run directory, and the loop's own methods for
logging, evaluating, drawing and saving. This loop holds the stacked state, steps it, and hands
each member a copy of its own state whenever the member evaluates or saves. <workdir> itself
holds the group's config.json (the command's config) and seeds.json (the members and the mean
and standard deviation of their final numbers).
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch

from seg import experiment, rundir, seeds
from seg import train as steps
from seg.data import batches
from seg.distributed import World
from seg.errors import config_errors
from seg.loop import _Loop, due
from seg.rundir import RunDir
from seg.tracking import Clock
from seg.writers import Writer


def member_config(cfg, k: int):
    """Member k's config: the separate run it equals (seed + k, num_seeds 1)."""
    member = copy.deepcopy(cfg)  # keeps FieldReferences linked (loss.ignore_index)
    member.seed = cfg.seed + k
    member.train.num_seeds = 1
    return member


class _MemberWriter(Writer):
    """A member's output: its own run directory; its lines start with its seed."""

    def __init__(self, run: RunDir, class_names, seed: int, **options):
        super().__init__(run, class_names, **options)
        self.prefix = f"seed{seed}  "

    def print(self, line: str) -> None:
        super().print(self.prefix + line)


class _Member(_Loop):
    """One member: a run's bookkeeping, stepped by SeedsLoop."""

    def __init__(self, cfg, run: RunDir, exp, device, world: World, writer: Writer, trainable,
                 eval_step, infer, group: dict):
        self._setup(cfg, run, exp, device, world, writer, trainable, eval_step, infer)
        self.rng = seeds.SeedRng(cfg.seed, device)
        self.group = group
        self.state: steps.TrainState | None = None

    def summary(self, step: int) -> dict:
        # train time is the group's: K members took it together
        return {**super().summary(step), "vmap_group": self.group}


class SeedsLoop:
    """Trains the members of `cfg` (train.num_seeds > 1) in <run>/seed<s>/."""

    def __init__(self, cfg, run: RunDir, exp: experiment.Experiment, device: torch.device,
                 world: World, writer: Writer):
        self.cfg, self.rundir, self.exp, self.device, self.writer = cfg, run, exp, device, writer
        t = cfg.train
        self.train_step, optimizer, trainable = experiment.train_step(cfg, exp.model,
                                                                      exp.loss_fn)
        eval_step = experiment.eval_step(cfg, exp.model, exp.loss_fn)
        infer = experiment.infer(cfg, exp.model)
        self.members, states = [], []
        for k in range(t.num_seeds):
            mcfg = member_config(cfg, k)
            mrun = RunDir(run.path / f"seed{mcfg.seed}")
            for change in mrun.check_usable(mcfg):
                writer.print(f"seed{mcfg.seed} changed on resume: {change}")
            params, buffers = exp.params, exp.buffers
            if k:
                with config_errors():
                    _, params, buffers, _ = experiment.init_model(mcfg, device)
            group = {"num_seeds": t.num_seeds, "member": k, "first_seed": cfg.seed,
                     "workdir": str(run.path)}
            mwriter = _MemberWriter(mrun, exp.info.class_names, mcfg.seed,
                                    enabled=world.writes, tensorboard=t.tensorboard)
            self.members.append(_Member(mcfg, mrun, exp, device, world, mwriter, trainable,
                                        eval_step, infer, group))
            states.append(steps.init_state(params, buffers, optimizer, trainable,
                                           channels_last=t.channels_last))
        self.state = seeds.stack_states(states)
        if world.writes:
            run.write_config(cfg)
            for m in self.members:
                m.rundir.write_config(m.cfg)
                m.rundir.write_inference(experiment.inference_meta(m.cfg, exp.info))

    # ------------------------------------------------------------------ resume

    def _resume(self) -> int:
        """The members' checkpoints of their newest common step, loaded and stacked."""
        runs = [m.rundir for m in self.members]
        if not any(r.checkpoint_files() for r in runs):
            return 0
        found = rundir.newest_common_checkpoint(runs, map_location=self.device)
        if found is None:
            self.writer.print(f"{self.rundir.path}: the members have no readable checkpoint of "
                              "one step (a run stopped while saving, with "
                              "train.keep_checkpoints=1?): starting from step 0")
            return 0
        step, payloads = found
        for m, payload in zip(self.members, payloads):
            m._restore(payload)
        self.state = seeds.stack_states([m.state for m in self.members])
        return step

    def _report(self, k: int, step: int, log_now: bool, eval_now: bool, save_now: bool,
                pictures) -> None:
        """Member k's work at a log, eval or save step, as a separate run does it, on a copy
        of its state made for the occasion (one member's at a time: K copies of a large model
        would not fit beside the stacked state). The clocks of all members pause for it."""
        m, keeps = self.members[k], eval_now or save_now
        if keeps:
            m.state = seeds.member_state(self.state, k)
        m._check_finite(step, keeps)
        if log_now:
            m._log(step)
        if eval_now:
            with self._paused("eval"):
                m._evaluate(step, "val")
                m.writer.summary(m.summary(step))
                if pictures:
                    m._draw(step, pictures)
        if save_now:
            with self._paused("checkpoint"):
                m._save(step)
        m.state = None

    @contextlib.contextmanager
    def _paused(self, kind: str):
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.clock.paused(kind))
            yield

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        cfg, t, members = self.cfg, self.cfg.train, self.members
        start = self._resume()
        finished = [m.rundir.finished(m.cfg) for m in members]
        if start == t.steps and all(s is not None for s in finished):
            self.writer.print(f"{self.rundir.path}: its {len(members)} members have finished")
            return self._summary(finished)
        for m in members:
            if m.world.writes:
                m.rundir.log.truncate_after(start, redo_splits=("test",))
            m.writer.start(start)
        pictures = members[0]._picture_batches() if members[0].world.writes else None
        train = self.exp.splits["train"]
        stream = batches.member_batches(
            train.dataset, train.transform, t.batch_size, [m.cfg.seed for m in members],
            start_step=start, device=self.device, workers=cfg.data.workers,
            prefetch=cfg.data.prefetch)
        rngs = [m.rng for m in members]
        for m in members:
            m.clock = Clock(self.device)
            if m._saved_clock is not None:
                m.clock.load_state_dict(m._saved_clock)
        for step in range(start + 1, t.steps + 1):
            t0 = time.perf_counter()
            batch = next(stream)
            waited = time.perf_counter() - t0
            for m in members:  # one stream feeds every member: each clock counts the wait
                m.clock.count_batch(waited)
            self.state, metrics = self.train_step(self.state, batch, rngs)
            for k, m in enumerate(members):
                m.window.add(self.state.step, seeds.member_metrics(metrics, k))
            log_now, eval_now, save_now = due(t, step)
            if log_now or eval_now or save_now:
                for k in range(len(members)):
                    self._report(k, step, log_now, eval_now, save_now, pictures)
        del stream  # stops the loader's workers before the test split is read
        summaries = []
        for k, m in enumerate(members):
            if "test" in self.exp.splits:  # not train time, of this member or the others
                m.state = seeds.member_state(self.state, k)
                with self._paused("test"):
                    m._evaluate(t.steps, "test")
                m.state = None
            summaries.append(m.summary(t.steps))
            m.writer.summary(summaries[-1])
            m.writer.close()
        return self._summary(summaries)

    def _summary(self, summaries: list[dict]) -> dict:
        """<workdir>/seeds.json: each member's final numbers, and their mean and standard
        deviation over the seeds (seg.sweep's), printed as one line."""
        from seg import sweep  # it imports the loop
        runs = [sweep.run_record(s, m.cfg.seed, m.rundir.path)
                for s, m in zip(summaries, self.members)]
        result = {"workdir": str(self.rundir.path), "num_seeds": len(runs), "runs": runs,
                  **{key: sweep.aggregate([r[key] for r in runs]) for key, _ in sweep.COLUMNS}}
        if self.members[0].world.writes:
            rundir.write_json(self.rundir.path / "seeds.json", result)
        cells = [f"{label} {sweep.mean_std(result[key], 4)}"
                 for key, label in sweep.COLUMNS[:3]]
        self.writer.print(f"{len(runs)} seeds: " + "  ".join(cells) +
                          f"  -> {self.rundir.path / 'seeds.json'}")
        return result
