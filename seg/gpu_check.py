"""One prepared run that checks and measures what a GPU changes (experiments/gpu_check.py runs
it with configs/benchmarks.py's plan). Four sections, each recorded on its own: a section that
fails is recorded with its error and the others still run.

  correctness  the functional step against the nn.Module + torch.optim loop; every optimizer
               against torch.optim, foreach and fused; the compiled step is one graph and does
               not recompile; no step waits for the host (torch.cuda.set_sync_debug_mode)
  benchmark    imperative fp32, our eager step and the fast path (compile + bf16 +
               channels_last) per model: step time, images/s, peak memory, TFLOP/s and MFU
               against a bf16 matrix product timed in the same run; then train.num_seeds=K's
               vmapped step against K steps in turn, on small models (seg/seeds_bench.py)
  loader       images/s of the real input pipeline per number of workers, against the pixel
               rate of the fast steps: is the GPU fed?
  training     a real run (seg.loop) with the fast path for the time left: its val mIoU,
               images/s and where its step time went

<out>/gpu_check.json is rewritten after every section (a run stopped by the end of its GPU
lease keeps what it measured); <out>/gpu_check.md is the same as tables. A time budget spreads
the run: each section leaves the later ones their reserve, a benchmark model is skipped when
its share is gone, and the training run is stopped when the budget ends.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import time
import traceback
from pathlib import Path

import torch
import torchvision

from seg import bench, parity, rundir, runtime, seeds_bench
from seg.data import roots
from seg.distributed import WorldInfo
from seg.errors import ConfigError

SECTIONS = ("correctness", "benchmark", "loader", "training")


class Context:
    """What every section reads: the plan, the device, the compile backend, the fast path's
    options, the clock of the budget, the output folder and the report so far."""

    def __init__(self, plan, out: Path):
        self.plan, self.out = plan, out
        self.device = runtime.select_device(plan.device, WorldInfo(0, 1, 0))
        cuda = self.device.type == "cuda"
        self.backend = (("inductor" if cuda else "eager") if plan.compile_backend == "auto"
                        else plan.compile_backend)
        bf16 = not cuda or torch.cuda.is_bf16_supported(including_emulation=False)
        self.precision = "bf16" if bf16 else "fp16"   # V100, T4, RTX 20xx: fp16
        self.fast_mode = "fast" if bf16 else "fast_fp16"
        self.end = time.perf_counter() + plan.budget_s
        self.report: dict = {}

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.end - time.perf_counter()

    def reserve_after(self, section: str) -> float:
        """Seconds the sections after `section` keep for themselves."""
        later = SECTIONS[SECTIONS.index(section) + 1:]
        return sum(self.plan[name].get("reserve_s", 0.0) for name in later)

    def save(self) -> None:
        rundir.write_json(self.out / "gpu_check.json", self.report)
        (self.out / "gpu_check.md").write_text(markdown(self.report))


def run(plan, out: str | os.PathLike) -> dict:
    """Runs every section of `plan` and returns the report written to <out>/gpu_check.json."""
    # deterministic cuBLAS (the parity checks) needs this before cuBLAS starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    check_plan(plan)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(plan, out)
    start = time.perf_counter()
    ctx.report.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), environment=environment(ctx.device), tiny=plan.tiny,
        compile_backend=ctx.backend, fast_precision=ctx.precision,
        plan=rundir.to_jsonable(plan.to_dict()))
    for name in SECTIONS:
        bench.progress(f"gpu_check: {name} ({ctx.left():.0f} s of the budget left)")
        t0 = time.perf_counter()
        try:
            result = globals()[name](ctx)
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            result = failure(e)
        result["seconds"] = time.perf_counter() - t0
        ctx.report[name] = result
        ctx.report["wall_s"] = time.perf_counter() - start
        ctx.save()
        torch._dynamo.reset()
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return ctx.report


def check_plan(plan) -> None:
    """The data folders the plan reads exist (a one-line error before anything runs)."""
    for where, data_cfg in (("loader.data", plan.loader.data),
                            ("training.config.data", plan.training.config.data)):
        root = roots.dataset_root(data_cfg)  # data.root, else $SEG_DATASETS/<data.dirname>
        if data_cfg.name != "synthetic" and not (root and Path(root).is_dir()):
            raise ConfigError(f"{where}: no CamVid folder at {root!r} (data.root or "
                              f"${roots.ENV}/camvid): give the copy with --camvid_root "
                              "(see experiments/gpu_check.py)")


def failure(e: BaseException) -> dict:
    return {"status": "error", "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:500],
            "traceback": traceback.format_exc()[-3000:]}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "device": runtime.device_name(device),
           "cpus": os.cpu_count(), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None}
    if device.type == "cuda":
        env.update(gpus=torch.cuda.device_count(),
                   memory_gib=torch.cuda.get_device_properties(device).total_memory / 2 ** 30,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_tf32=torch.backends.cudnn.allow_tf32)
    return env


# ---------------------------------------------------------------- correctness


def correctness(ctx: Context) -> dict:
    k, checks, device = ctx.plan.correctness, {}, ctx.device
    for name, cfg in k.models.items():
        checks[f"step_vs_imperative/{name}"] = _guarded(
            parity.step_parity, cfg, device, k.image_size, k.batch_size, k.steps)
    checks["optimizers"] = _guarded(parity.optimizer_parity, k.optimizer_model, device,
                                    k.optimizer_steps)
    compiled: dict = {}
    checks["compile"] = _guarded(parity.compile_check, k.models.unet, device, ctx.backend,
                                 ctx.precision, k.batch_size, k.image_size, k.compile_steps,
                                 compiled)
    checks["host_sync"] = _guarded(parity.sync_check, k.models.pspnet_r18, device,
                                   k.batch_size, k.image_size, compiled)
    failed = [n for n, c in checks.items() if c.get("passed") is False]
    return {"status": "failed" if failed else "passed", "failed": failed, "checks": checks}


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one check failing does not stop the others
        return {"passed": False, **failure(e)}


# ---------------------------------------------------------------- benchmark


def benchmark(ctx: Context) -> dict:
    b = ctx.plan.benchmark
    cuda = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if ctx.precision == "bf16" else torch.float16
    peak = bench.matmul_tflops(ctx.device, dtype, n=b.matmul_size, iters=20 if cuda else 2,
                               repeats=5 if cuda else 2)
    modes = [ctx.fast_mode if m == "fast" else m for m in b.modes]
    result = {"status": "done", "matmul_peak_tflops": peak, "matmul_dtype": str(dtype),
              "matmul_size": b.matmul_size, "modes": modes, "batch_size": b.batch_size,
              "image_size": b.image_size, "models": [], "skipped": {}, "errors": {}}
    ctx.report["benchmark"] = result
    for name, cfg in b.models.items():
        left = ctx.left() - ctx.reserve_after("benchmark")
        if left < b.model_budget_s:
            result["skipped"][name] = f"time budget ({left:.0f} s left of the section's share)"
            continue
        try:
            setup = bench.Setup(cfg, ctx.device, b.batch_size, b.image_size, b.labels[name],
                                name)
            with runtime.cudnn_autotuning(True):
                result["models"].append(bench.time_modes(
                    setup, modes, rounds=b.rounds, steps=b.steps, warmup=b.warmup,
                    backend=ctx.backend, memory=cuda, peak_tflops=peak))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next model runs
            result["errors"][name] = failure(e)["error"]
        setup = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        ctx.save()
    result["vmap_seeds"] = _vmap_seeds(ctx, result)
    if result["errors"] or result["skipped"]:
        result["status"] = "partial"
    return result


def _vmap_seeds(ctx: Context, result: dict) -> list[dict]:
    """seeds_bench's rows for each model of the plan's vmap_seeds, at the fast path's
    precision (fp32 where that is fp16: a vmapped step refuses loss scaling)."""
    v, rows = ctx.plan.benchmark.vmap_seeds, []
    for name, cfg in v.models.items():
        left = ctx.left() - ctx.reserve_after("benchmark")
        if left < v.model_budget_s:
            result["skipped"][f"vmap {name}"] = f"time budget ({left:.0f} s left)"
            continue
        cfg = copy.deepcopy(cfg)
        if ctx.precision != "bf16":
            cfg.train.precision = "fp32"
        try:
            found = seeds_bench.benchmark(cfg, tuple(v.num_seeds), batch_size=v.batch_size,
                                          crop=tuple(v.crop), device=ctx.device,
                                          rounds=v.rounds)
            rows += [{**r, "label": v.labels[name]} for r in found]
        except Exception as e:  # noqa: BLE001 - recorded like a benchmark model's failure
            result["errors"][f"vmap {name}"] = failure(e)["error"]
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.save()
    return rows


# ---------------------------------------------------------------- loader


def loader(ctx: Context) -> dict:
    d = ctx.plan.loader
    rows = bench.loader_rates(d.data, d.batch_size, 0, list(d.workers), steps=d.steps,
                              warmup=d.warmup, device=ctx.device)
    best = max(rows, key=lambda r: r["images_per_s"])
    fed = []
    for r in (ctx.report.get("benchmark") or {}).get("models", []):
        fast = r["modes"].get(ctx.fast_mode)
        if fast:
            need = fast["images_per_s"] * r["image_size"] ** 2 / 1e6
            fed.append({"model": r["label"], "step_megapixels_per_s": need,
                        "loader_over_step": best["megapixels_per_s"] / need,
                        "fed": best["megapixels_per_s"] >= need})
    return {"status": "done", "rows": rows, "best_workers": best["workers"],
            "batch_size": d.batch_size, "data": d.data.name, "fast_steps": fed,
            "note": "megapixels/s compare the loader's crops with the benchmark's 512x512 "
                    "batches: a segmentation network's cost grows with the pixels it sees"}


# ---------------------------------------------------------------- training


def training(ctx: Context) -> dict:
    t = ctx.plan.training
    cfg = copy.deepcopy(t.config)
    cuda = ctx.device.type == "cuda"
    cfg.train.update(device=str(ctx.device), compile=cuda, precision=ctx.precision)
    loader_result = ctx.report.get("loader") or {}
    if "best_workers" in loader_result and not ctx.plan.tiny:
        cfg.data.workers = loader_result["best_workers"]
    if t.fit_steps:
        cfg.train.steps = fit_steps(ctx, cfg)
        every = max(1, cfg.train.steps // t.evals)
        cfg.train.update(eval_every=every, checkpoint_every=cfg.train.steps)
    workdir, log = ctx.out / "train", ctx.out / "train.log"
    if workdir.exists():   # this tool's own run of an earlier gpu_check in the same folder
        shutil.rmtree(workdir)
    proc = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(cfg, str(workdir), str(log)))
    proc.start()
    proc.join(max(1.0, ctx.left()))
    stopped = proc.is_alive()
    if stopped:   # the budget is spent: what the run wrote so far is the result
        proc.terminate()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()
    result = {"status": "stopped" if stopped else "done" if proc.exitcode == 0 else "error",
              "exitcode": proc.exitcode, "steps_planned": cfg.train.steps,
              "model": f"{cfg.model.name} {cfg.model.get('backbone', '')}".strip(),
              "data": cfg.data.name, "batch_size": cfg.train.batch_size,
              "crop": list(cfg.data.crop_size), "workers": cfg.data.workers,
              "precision": cfg.train.precision, "compile": cfg.train.compile,
              "channels_last": cfg.train.channels_last, "workdir": str(workdir)}
    text = log.read_text() if log.exists() else ""
    if first := re.search(r"step \d+ took ([\d.]+)s", text):
        result["first_step_s"] = float(first.group(1))
    if result["status"] == "error":
        result["error"] = text.strip().splitlines()[-1] if text.strip() else "no output"
    if (workdir / "config.json").exists():
        result.update(run_numbers(rundir.load(workdir)))
    return result


def fit_steps(ctx: Context, cfg) -> int:
    """As many steps as the time left allows (less the compilation and the evals) at the
    speed measured before: the slower of the fast step (the benchmark's, for the same model,
    scaled by pixels) and the loader (its best worker count)."""
    t = ctx.plan.training
    rates = []
    crop = cfg.data.crop_size[0] * cfg.data.crop_size[1]
    for r in (ctx.report.get("benchmark") or {}).get("models", []):
        fast = r["modes"].get(ctx.fast_mode)
        if fast and r["model"] == cfg.model.name:
            rates.append(fast["images_per_s"] * r["image_size"] ** 2 / crop)
    loader_rows = (ctx.report.get("loader") or {}).get("rows", [])
    if loader_rows:
        rates.append(max(r["images_per_s"] for r in loader_rows))
    if not rates:
        return t.min_steps
    seconds = ctx.left() - t.compile_allowance_s - 10.0 * t.evals
    steps = int(0.8 * seconds * min(rates) / cfg.train.batch_size)
    return max(t.min_steps, min(t.max_steps, steps))


def _train_child(cfg, workdir: str, log: str) -> None:
    from seg import loop   # the child's own import: nothing of the parent's CUDA state

    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            loop.train_and_evaluate(cfg, workdir)
        except BaseException:
            traceback.print_exc()
            f.flush()
            raise SystemExit(1)


def run_numbers(run: rundir.Run) -> dict:
    """What a (possibly stopped) run directory says: steps done, the last val eval, speed and
    where the step time went (the train records after the first, which holds compilation)."""
    train = [r for r in run.records if r["split"] == "train"]
    val = [r for r in run.records if r["split"] == "val"]
    steady = train[1:] or train
    out = {"steps_done": train[-1]["step"] if train else 0}
    if val:
        out["val"] = {k: val[-1][k] for k in ("step", "miou", "pixel_acc", "loss")}
    if steady:
        step_s = sum(r["step_s"] for r in steady)
        out.update(images_per_s=statistics.median(r["images_per_s"] for r in steady),
                   step_s=step_s / len(steady),
                   data_wait_share=sum(r["data_s"] for r in steady) / step_s,
                   last_loss=train[-1]["loss"])
        mem = [r["peak_mem_gib"] for r in steady if r.get("peak_mem_gib") is not None]
        if mem:
            out["peak_mem_gib"] = max(mem)
    if run.summary:
        out["summary"] = {k: run.summary.get(k) for k in ("steps", "wall_time_s",
                                                           "train_time_s", "images_per_s")}
    return out


# ---------------------------------------------------------------- the report as tables


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"# gpu_check {report.get('date', '')}", "",
             f"{env.get('device')}, torch {env.get('torch')}, torchvision "
             f"{env.get('torchvision')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"Python {env.get('python')}, {env.get('cpus')} CPUs; compile backend "
             f"{report.get('compile_backend')}, fast path precision "
             f"{report.get('fast_precision')}{' (tiny)' if report.get('tiny') else ''}; "
             f"wall {report.get('wall_s', 0):.0f} s", ""]
    for name in SECTIONS:
        if name in report:
            section = report[name]
            lines += [f"## {name}: {section.get('status')} ({section.get('seconds', 0):.0f} s)",
                      ""]
            if section.get("status") == "error":
                lines += [f"error: {section['error']}", ""]
            else:
                lines += _TABLES[name](section) + [""]
    return "\n".join(lines)


def _md_correctness(s: dict) -> list[str]:
    rows = ["| check | passed | numbers |", "|---|---|---|"]
    for name, c in s["checks"].items():
        if name == "optimizers" and "error" not in c:
            for opt, r in c.items():
                if isinstance(r, dict):
                    ms = ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms_per_update"].items())
                    rows.append(f"| optimizer {opt} | {r['passed']} | fused {r['fused_max_ulp']}"
                                f" ulp, foreach {r['foreach_max_ulp']} ulp (update error "
                                f"{r['foreach_update_error']:.1e}); {ms} |")
            continue
        numbers = {k: v for k, v in c.items()
                   if k not in ("passed", "criterion", "traceback", "steps")
                   and not isinstance(v, dict)}
        if isinstance(c.get("steps"), dict):
            numbers.update({k: v.get("error", "ok") for k, v in c["steps"].items()})
        rows.append(f"| {name} | {c.get('passed')} | "
                    + ", ".join(f"{k} {_fmt(v)}" for k, v in numbers.items()) + " |")
    return rows


def _md_benchmark(s: dict) -> list[str]:
    rows = [f"peak: {s['matmul_peak_tflops']:.3g} TFLOP/s measured ({s['matmul_size']}^3 "
            f"{s['matmul_dtype']} matmul); batch {s['batch_size']} at {s['image_size']}x"
            f"{s['image_size']}", "", bench.table_head(mfu=True)]
    rows += [bench.table_rows(r, mfu=True) for r in s["models"]]
    rows += [f"| {name} | skipped: {why} |" for name, why in s["skipped"].items()]
    rows += [f"| {name} | error: {why} |" for name, why in s["errors"].items()]
    if s.get("vmap_seeds"):
        rows += ["", "train.num_seeds: one vmapped step of K members against K steps in turn",
                 "", seeds_bench.markdown(s["vmap_seeds"], lambda r: r["label"])]
    return rows


def _md_loader(s: dict) -> list[str]:
    rows = ["| workers | images/s | megapixels/s |", "|---|---|---|"]
    rows += [f"| {r['workers']} | {r['images_per_s']:.1f} | {r['megapixels_per_s']:.1f} |"
             for r in s["rows"]]
    rows.append("")
    rows += [f"- {f['model']} fast step needs {f['step_megapixels_per_s']:.1f} Mpx/s: "
             f"{'fed' if f['fed'] else 'NOT fed'} (loader / step {f['loader_over_step']:.2f})"
             for f in s["fast_steps"]]
    return rows


def _md_training(s: dict) -> list[str]:
    val = s.get("val", {})
    return [f"{s['model']} on {s['data']}, batch {s['batch_size']}, crop {s['crop']}, "
            f"{s['precision']}, compile {s['compile']}, {s['workers']} workers: "
            f"{s.get('steps_done', 0)} of {s['steps_planned']} steps ({s['status']})", "",
            "| val mIoU (step) | images/s | step s | data wait | first step s | peak mem GiB |",
            "|---|---|---|---|---|---|",
            f"| {_fmt(val.get('miou'))} ({val.get('step', '-')}) | {_fmt(s.get('images_per_s'))}"
            f" | {_fmt(s.get('step_s'))} | {_fmt(s.get('data_wait_share'), pct=True)} | "
            f"{_fmt(s.get('first_step_s'))} | {_fmt(s.get('peak_mem_gib'))} |"]


_TABLES = {"correctness": _md_correctness, "benchmark": _md_benchmark, "loader": _md_loader,
           "training": _md_training}


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.0f}%"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
