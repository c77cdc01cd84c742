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
                   width dynamic where the network allows it (export.json says which sizes
                   were checked). torch.export.load(path).module()(x); seg not needed.
  model.onnx       the same in ONNX, when the optional onnx, onnxscript and onnxruntime
                   packages are installed (onnxruntime runs the numerical check).
  inference.json   the run's: the model's definition, classes, palette, normalisation.
  export.json      what was exported from which checkpoint, and each check's largest difference.

Every file is checked before it is written: read back from its bytes, run on the same inputs
as the run's functional forward (seg.train.make_infer, eval mode, float32, whole image), and
refused (nothing written) when its logits differ by more than float rounding allows.
Normalisation, sliding windows and TTA stay outside the network: inference.json holds the
mean and std, and config.json the run's eval settings.
"""
from __future__ import annotations

import importlib.util
import io
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
# (BatchNorm folded into scale and shift, for one), so results move by a few ulp per layer;
# ~1e-6 relative after 50-100 layers. 1e-4 leaves room for that and still catches a wrong
# weight, a missing layer or a train-mode BatchNorm, which move logits by far more.
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
    onnx_required: a missing ONNX package is an error (after the other files are written)
    instead of a note."""
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
    model = _plain_model(meta, state, source)
    reference = _reference(meta, saved["state"])
    examples = _examples(cfg, meta, size)
    expected = [reference(x) for x in examples]
    out.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(source), "step": int(saved["state"]["step"]),
              "input": "float32 (B, 3, H, W): (pixels / 255 - mean) / std, mean and std in "
                       "inference.json; H and W multiples of pad_multiple, as evaluation pads "
                       "images",
              "output": f"float32 (B, {meta['num_outputs']}, H, W) logits of the main head",
              "checked_shapes": [list(x.shape) for x in examples], "files": {}, "max_diff": {},
              "skipped": {}}
    if "weights" in formats:
        data = _bytes(lambda f: torch.save(state, f))
        loaded = _plain_model(meta, torch.load(io.BytesIO(data), weights_only=True), source)
        _write(out / "weights.pt", data, "weights", MainHead(loaded), examples, expected, record)
    missing_onnx = None
    if "program" in formats:
        program = _program(MainHead(model), examples[0])
        data = _bytes(lambda f: torch.export.save(program, f))
        loaded = torch.export.load(io.BytesIO(data)).module()
        record["dynamic"] = _dynamic_dims(program)
        _write(out / "model.pt2", data, "program", loaded, examples, expected, record)
    if "onnx" in formats:
        missing_onnx = missing_onnx_packages()
        if missing_onnx:
            record["skipped"]["onnx"] = (f"needs the optional packages {', '.join(missing_onnx)}"
                                         f" (pip install {' '.join(ONNX_PACKAGES)})")
        else:
            data = _onnx_bytes(MainHead(model), examples[0])
            _write(out / "model.onnx", data, "onnx", _onnx_runner(data), examples, expected,
                   record)
    rundir.write_json(out / "inference.json", meta)
    rundir.write_json(out / "export.json", record)
    for kind, path in record["files"].items():
        log(f"{kind}: {path} (largest logit difference {record['max_diff'][kind]:.3g})")
    for kind, why in record["skipped"].items():
        log(f"{kind}: skipped, {why}")
    if missing_onnx and onnx_required:
        raise ConfigError(f"--formats=onnx {record['skipped']['onnx']}; the other files are "
                          f"written in {out}")
    return record


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


def _program(module: nn.Module, example: Tensor):
    """torch.export of the network with batch, height and width left to torch.export
    (Dim.AUTO: dynamic unless the network fixes them)."""
    auto = torch.export.Dim.AUTO
    with torch.no_grad():
        return torch.export.export(module, (example,),
                                   dynamic_shapes={"images": {0: auto, 2: auto, 3: auto}})


def _dynamic_dims(program) -> list[str]:
    """Which input dimensions the program leaves free."""
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder"
                       and n.name in program.graph_signature.user_inputs)
    shape = placeholder.meta["val"].shape
    return [name for name, d in zip(("batch", "channels", "height", "width"), shape)
            if not isinstance(d, int)]


def _onnx_bytes(module: nn.Module, example: Tensor) -> bytes:
    auto = torch.export.Dim.AUTO
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                    output_names=["logits"],
                                    dynamic_shapes={"images": {0: auto, 2: auto, 3: auto}})
    return program.model_proto.SerializeToString()


def _onnx_runner(data: bytes) -> Callable[[Tensor], Tensor]:
    import onnxruntime   # optional: only when the packages are installed

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _bytes(save: Callable) -> bytes:
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def _write(path: Path, data: bytes, kind: str, run_it: Callable[[Tensor], Tensor],
           examples: list[Tensor], expected: list[Tensor], record: dict) -> None:
    """Writes `data` to `path` atomically once `run_it` (the file read back) reproduces the
    functional forward's logits on every example; ConfigError naming the file otherwise."""
    worst = 0.0
    with torch.no_grad():
        for x, want in zip(examples, expected):
            try:
                got = run_it(x)
            except Exception as e:  # noqa: BLE001 - e.g. a guard of the exported graph
                raise ConfigError(f"{kind} export fails on input {tuple(x.shape)}: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                                  ) from None
            if got.shape != want.shape:
                raise ConfigError(f"{kind} export gives {tuple(got.shape)} for "
                                  f"{tuple(x.shape)}, the run {tuple(want.shape)}")
            diff = float((got.float() - want).abs().max())
            limit = RELATIVE_TOLERANCE * max(1.0, float(want.abs().max()))
            if not diff <= limit:
                raise ConfigError(f"{kind} export differs from the run's forward by {diff:.3g} "
                                  f"(> {limit:.3g}) on input {tuple(x.shape)}; not written")
            worst = max(worst, diff)
    rundir.replace_atomically(path, lambda f: f.write(data), binary=True)
    record["files"][kind] = str(path)
    record["max_diff"][kind] = worst
