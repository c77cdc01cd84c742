"""Exporting a trained run for use outside seg: experiments/export.py's library half.

  export_run("runs/psp")   # -> runs/psp/export/

Writes, into the output folder:
  weights.pt       the model's params and buffers (no optimizer state) as one state_dict, which
                   loads strictly into the plain nn.Module with torch.load(weights_only=True):
                     spec = json.load(open("runs/psp/export/inference.json"))
                     model = seg.models.build(spec["model"], spec["num_outputs"]).eval()
                     model.load_state_dict(torch.load("runs/psp/export/weights.pt",
                                                      weights_only=True))
  model.pt2        a torch.export program of the eval-mode network: normalised float32 images
                   (B, 3, H, W) -> main-head logits (B, num_outputs, H, W); batch, height and
                   width dynamic, or where that fails its check, the batch only (export.json
                   says which, and the shapes checked). torch.export.load(path).module()(x);
                   seg not needed.
  model.onnx       the same in ONNX, when the optional onnx, onnxscript and onnxruntime
                   packages are installed (onnxruntime runs the numerical check).
  inference.json   the run's: the model's definition, classes, palette, normalisation.
  export.json      what was exported from which checkpoint, and each check's largest difference.

Every file is checked before it is written: read back from its bytes, run on the same inputs
as the run's functional forward (seg.train.make_infer, eval mode, float32, whole image), and
refused (not written) when its logits differ by more than float rounding allows; the other
formats are still written, and the error at the end names the refused one.
Normalisation, sliding windows and TTA stay outside the network: inference.json holds the
mean and std, and config.json the run's eval settings.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from seg import evaluation, models, rundir
from seg import train as steps
from seg.errors import ConfigError

FORMATS = ("weights", "program", "onnx")
# Largest logit difference a check accepts, relative to the largest logit (at least 1): the
# exported graphs run the same float32 operations, some fused or decomposed differently
# (BatchNorm folded into scale and shift, for one), which moves results by a few ulp per layer
# (float32's ulp is 1.2e-7 relative): measured, 0 for torch.export and up to 1.5e-6 for
# onnxruntime on tiny UNet, PSPNet, DeepLabV3 and FCN runs. 1e-4 leaves room for deeper nets
# and still catches a wrong weight, a missing layer or a train-mode BatchNorm, which move the
# logits by far more.
RELATIVE_TOLERANCE = 1e-4
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class MainHead(nn.Module):
    """The network as exported: images -> the main head's logits (the auxiliary head, a
    training aid, is left out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)["out"]


def export_run(workdir: str | os.PathLike, out: str | os.PathLike | None = None,
               checkpoint: str | None = None, formats=FORMATS, size=None,
               onnx_required: bool = False, defaults=None,
               log: Callable[[str], None] = print) -> dict:
    """Exports the run in `workdir` (see the module docstring) and returns export.json's
    record. checkpoint: "last" (default), "best" or a file. size: (H, W) of the example input
    (default: data.crop_size, else data.image_size, rounded up to data.pad_multiple).
    A format that fails its export or its check is left out and the others are written; the
    ConfigError raised at the end names it. onnx_required: missing ONNX packages are such a
    failure too, instead of a note."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"--formats={','.join(formats)}: choose from {', '.join(FORMATS)}")
    run = rundir.RunDir(workdir)
    cfg, meta = run.config(defaults), run.inference()
    saved, source = evaluation.restore(run, checkpoint, "cpu")
    out = Path(out) if out is not None else run.path / "export"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out} is a file, not a folder")
    state = {k: v.contiguous() for part in ("params", "buffers")
             for k, v in saved["state"][part].items()}
    model = MainHead(_plain_model(meta, state, source)).eval()
    check = _Check(_reference(meta, saved["state"]), _examples(cfg, meta, size))
    out.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(source), "step": int(saved["state"]["step"]),
              "input": "float32 (B, 3, H, W): (pixels / 255 - mean) / std, mean and std in "
                       "inference.json; H and W multiples of pad_multiple, as evaluation pads "
                       "images",
              "output": f"float32 (B, {meta['num_outputs']}, H, W) logits of the main head",
              "checked_shapes": [list(x.shape) for x in check.examples], "files": {},
              "max_diff": {}, "shapes": {}, "skipped": {}, "failed": {}}
    writers = {"weights": lambda: _weights(out, state, meta, source, check, record),
               "program": lambda: _traced(out / "model.pt2", "program", _program_file, model,
                                          check, record),
               "onnx": lambda: _traced(out / "model.onnx", "onnx", _onnx_file, model, check,
                                       record)}
    for kind in FORMATS:
        if kind not in formats:
            continue
        if kind == "onnx" and (missing := missing_onnx_packages()):
            why = (f"needs the optional packages {', '.join(missing)} (pip install "
                   f"{' '.join(ONNX_PACKAGES)})")
            record["failed" if onnx_required else "skipped"][kind] = why
            continue
        try:
            writers[kind]()
        except ConfigError as e:
            record["failed"][kind] = str(e)
    rundir.write_json(out / "inference.json", meta)
    rundir.write_json(out / "export.json", record)
    for kind, path in record["files"].items():
        log(f"{kind}: {path} ({record['shapes'][kind]}; largest logit difference "
            f"{record['max_diff'][kind]:.3g})")
    for kind, why in record["skipped"].items():
        log(f"{kind}: skipped, {why}")
    if record["failed"]:
        raise ConfigError("; ".join(f"--formats={kind}: {why}" for kind, why in
                                    record["failed"].items()) +
                          f" (the other files are written in {out})")
    return record


def _weights(out: Path, state: dict, meta: dict, source, check: "_Check", record: dict) -> None:
    data = _bytes(lambda f: torch.save(state, f))
    loaded = _plain_model(meta, torch.load(io.BytesIO(data), weights_only=True), source)
    worst = check("weights", MainHead(loaded).eval(), check.examples)
    _write(out / "weights.pt", data, "weights", worst, "any shape the network takes", record)


def _traced(path: Path, kind: str, make: Callable, model: nn.Module, check: "_Check",
            record: dict) -> None:
    """Exports with batch, height and width dynamic and checks both example shapes; when that
    fails (a network whose graph fixes the image size, or an exporter that does), exports with
    the batch dynamic only and checks the first example's size."""
    first = check.examples[0]
    attempts = [(("batch", "height", "width"), check.examples,
                 "dynamic batch, height and width"),
                (("batch",), [first, first[:1]],
                 f"dynamic batch; height and width fixed at {first.shape[2]}x{first.shape[3]}")]
    error = None
    for free, examples, label in attempts:
        try:
            data, run_it = make(model, first, free)
            worst = check(kind, run_it, examples)
        except ConfigError as e:
            error = e
            continue
        _write(path, data, kind, worst, label, record)
        return
    raise error


def missing_onnx_packages() -> list[str]:
    """The optional packages of the ONNX export that are not installed."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def _plain_model(meta: dict, state: dict, source) -> nn.Module:
    """The run's nn.Module with `state` loaded strictly, in eval mode."""
    model = models.build(meta["model"], meta["num_outputs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{source} does not hold this run's model "
                          f"({' '.join(str(e).split())[:300]})") from None
    return model.eval()


def _reference(meta: dict, state: dict) -> Callable[[Tensor], Tensor]:
    """The run's functional forward in float32, whole image, eval mode."""
    with torch.device("meta"):
        definition = models.build(meta["model"], meta["num_outputs"])
    definition.eval()
    infer = steps.make_infer(definition)
    return lambda x: infer(state["params"], state["buffers"], x)


def _examples(cfg, meta: dict, size) -> list[Tensor]:
    """Normalised-like inputs (N(0, 1)): batch 2 at the example size, and batch 1 at a larger
    size, each a multiple of data.pad_multiple (what evaluation feeds the network)."""
    m = meta["pad_multiple"]
    if size is None:
        crop = tuple(cfg.data.crop_size)
        size = crop if crop else (cfg.data.image_size,) * 2
    try:
        h, w = (-(-int(s) // m) * m for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"--size={size}: must be H,W") from None
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, h, w, generator=g), torch.randn(1, 3, h + m, w + 2 * m, generator=g)]


def _dynamic(free: tuple[str, ...]) -> dict:
    """dynamic_shapes for the input `images`: the named dimensions left to torch.export
    (Dim.AUTO: dynamic unless the network fixes them), the others static."""
    dims = {"batch": 0, "height": 2, "width": 3}
    return {"images": {dims[d]: torch.export.Dim.AUTO for d in free}}


def _program_file(model: nn.Module, example: Tensor, free: tuple[str, ...]):
    """(bytes of the torch.export program, the program read back from them)."""
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=_dynamic(free))
    except Exception as e:  # noqa: BLE001 - an op or a shape torch.export cannot capture
        raise ConfigError(f"torch.export fails: {type(e).__name__}: {_short(e)}") from None
    data = _bytes(lambda f: torch.export.save(program, f))
    return data, torch.export.load(io.BytesIO(data)).module()


def _onnx_file(model: nn.Module, example: Tensor, free: tuple[str, ...]):
    """(bytes of the ONNX model, an onnxruntime session over them)."""
    try:
        with torch.no_grad(), _quiet("onnxscript", "onnx_ir"):  # one INFO line per rewrite
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=_dynamic(free))
        data = program.model_proto.SerializeToString()
    except Exception as e:  # noqa: BLE001 - an op the ONNX exporter does not translate
        raise ConfigError(f"the ONNX exporter fails: {type(e).__name__}: {_short(e)}") from None
    return data, _onnx_runner(data)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Those loggers at WARNING for the duration (absl's app sets the root logger to INFO)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _onnx_runner(data: bytes) -> Callable[[Tensor], Tensor]:
    import onnxruntime   # optional: only when the packages are installed

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4   # fatal only: a failed run comes back as our one error line
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _bytes(save: Callable) -> bytes:
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


class _Check:
    """Runs an exported model on example inputs against the run's functional forward."""

    def __init__(self, reference: Callable[[Tensor], Tensor], examples: list[Tensor]):
        self.reference, self.examples, self._expected = reference, examples, {}

    def __call__(self, kind: str, run_it: Callable[[Tensor], Tensor],
                 examples: list[Tensor]) -> float:
        """The largest logit difference over `examples`; ConfigError naming the format when
        it fails to run or differs by more than RELATIVE_TOLERANCE allows."""
        worst = 0.0
        with torch.no_grad():
            for x in examples:
                want = self._want(x)
                try:
                    got = run_it(x)
                except Exception as e:  # noqa: BLE001 - e.g. a guard of the exported graph
                    raise ConfigError(f"{kind} export fails on input {tuple(x.shape)}: "
                                      f"{type(e).__name__}: {_short(e)}") from None
                if got.shape != want.shape:
                    raise ConfigError(f"{kind} export gives {tuple(got.shape)} for "
                                      f"{tuple(x.shape)}, the run {tuple(want.shape)}")
                diff = float((got.float() - want).abs().max())
                limit = RELATIVE_TOLERANCE * max(1.0, float(want.abs().max()))
                if not diff <= limit:
                    raise ConfigError(f"{kind} export differs from the run's forward by "
                                      f"{diff:.3g} (> {limit:.3g}) on input {tuple(x.shape)}; "
                                      "not written")
                worst = max(worst, diff)
        return worst

    def _want(self, x: Tensor) -> Tensor:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in self._expected:
            self._expected[key] = self.reference(x)
        return self._expected[key]


def _write(path: Path, data: bytes, kind: str, worst: float, shapes: str, record: dict) -> None:
    rundir.replace_atomically(path, lambda f: f.write(data), binary=True)
    record["files"][kind], record["max_diff"][kind], record["shapes"][kind] = \
        str(path), worst, shapes


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
