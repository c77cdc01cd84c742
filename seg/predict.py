"""Segmenting new images with a trained run: experiments/predict.py's library half.

  predict_run("runs/psp", ["photos/", "more/*.jpg"], "out/")

The run directory is all it needs: the model and the eval forward from config.json (the run's
precision, memory format, whole-image / sliding-window inference and test-time augmentation,
each overridable), the classes, palette and normalisation from inference.json, the weights from
a checkpoint (`best`, `last` or a file). Each image goes through what evaluation does to a val
image: data.resize when the run used it, padding at the bottom and right to data.pad_multiple
with the mean colour, batches of images of the same padded size on the device, the padding cut
off the logits (and with data.resize, the logits resized back to the image), argmax.

For each image, in the output folder (every file replaced atomically; an image gets all of its
files or none):
  <name>.png          the class index of every pixel, a palette PNG in the dataset's colours
  <name>_overlay.png  the image | the prediction laid over it, with a legend (overlay=True)
  <name>_probs.npy    float32 (num_classes, H, W) class probabilities (probabilities=True)
and predictions.json: the settings, and per image its size, files and class areas, and every
input that failed with the reason. A bad input is reported in one line and the others are
still written; the caller learns of it from predictions.json and the DataError raised at the end.
"""
from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from seg import distributed, evaluation, experiment, functional, inference, metrics, models
from seg import rundir, runtime, visualize
from seg.data import augment, batches, files
from seg.errors import ConfigError, DataError, config_errors

# What a folder is searched for (a file named on the command line is read whatever its name).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                            ".ppm", ".pgm"})
SUMMARY = "predictions.json"
_JPEG_MAGIC = b"\xff\xd8\xff"
# PIL modes read as they are (8 bits per channel): grey, palette, RGB, with or without alpha
_TO_RGB = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                     "YCbCr"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


# ---------------------------------------------------------------- inputs

def collect(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files named by `inputs`, each once, in the order given: a file as it is, a
    folder's image files (by suffix, sorted), a glob's matches (sorted). Also (input, reason)
    for each input that names nothing."""
    found, problems, seen = [], [], set()

    def add(path: Path) -> None:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            found.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                problems.append((item, "a folder without image files"))
            for p in images:
                add(p)
        elif path.exists():
            add(path)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                problems.append((item, "matches no file"))
            for p in matches:
                add(p)
        else:
            problems.append((item, "no such file or folder"))
    return found, problems


def read_input(path: str | os.PathLike, background: Sequence[int] = (0, 0, 0)) -> Tensor:
    """An image file as a user sees it, as uint8 (3, H, W):
      - EXIF orientation applied (a phone's portrait photo comes out upright);
      - grayscale and palette images expanded to RGB;
      - transparency composited over `background` (pass the dataset's mean colour: what the
        model sees in the eval padding, zero after normalisation);
      - 16-bit grayscale scaled to 8 bits over its full range (v * 255 / 65535, rounded); PIL
        reads 16-bit RGB PNGs at 8 bits (their high byte).
    Raises DataError naming the file for anything else: unreadable, corrupt or truncated, or
    channels that are not an image (float, multi-band)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if head == _JPEG_MAGIC:  # the decoder the training data went through (seg.data.files)
        try:
            raw = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as e:
            raise DataError(f"{path}: corrupt or truncated JPEG ({_first_line(e)})") from None
    with files.open_pil(path) as im:
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im, path, background)


def _to_rgb(im: Image.Image, path: str, background: Sequence[int]) -> Tensor:
    if im.mode in _SIXTEEN_BIT:
        values = np.asarray(im, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: mode {im.mode} with values outside 0-65535 is not a "
                            "16-bit image")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)   # rounded to nearest
        return torch.from_numpy(grey).expand(3, *grey.shape).contiguous()
    if im.mode not in _TO_RGB:
        bands = len(im.getbands())
        raise DataError(f"{path}: mode {im.mode} ({bands} channel{'s' * (bands != 1)}) is not "
                        "an image predict reads: grayscale, RGB, RGBA, palette or 16-bit "
                        "grayscale")
    has_alpha = im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*map(int, background), 255))
        im = Image.alpha_composite(canvas, rgba)
    rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output file stems: each input's own stem; a stem met again gets -2, -3, ..."""
    names, used = [], {}
    for p in paths:
        n = used.get(p.stem, 0) + 1
        used[p.stem] = n
        names.append(p.stem if n == 1 else f"{p.stem}-{n}")
    return names


class _Inputs(torch.utils.data.Dataset):
    """Reads each input in a DataLoader worker; a bad one comes back as its error message."""

    def __init__(self, paths: Sequence[Path], background: Sequence[int]):
        self.paths, self.background = list(paths), tuple(background)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, read_input(self.paths[i], self.background), None
        except DataError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - any decoder failure is this input's failure
            return i, None, f"{self.paths[i]}: cannot be read ({type(e).__name__}: " \
                            f"{_first_line(e)})"


def _as_list(items):
    return items


# ---------------------------------------------------------------- the model

class Predictor:
    """The run's trained model as images -> (probabilities, labels) at each image's own size,
    through the run's one eval forward (seg.experiment.infer)."""

    def __init__(self, cfg, meta: dict, state: dict, device: torch.device):
        with torch.device("meta"):   # the definition only: the weights are the checkpoint's
            self.model = models.build(cfg.model, meta["num_outputs"])
        _check_state(state, self.model)
        self.params = {k: v.to(device) for k, v in state["params"].items()}
        self.buffers = {k: v.to(device) for k, v in state["buffers"].items()}
        self.infer = experiment.infer(cfg, self.model)
        self.meta, self.device = meta, device
        self.num_classes = len(meta["class_names"])
        self.fill = augment.mean_colour(meta["mean"])

    def prepare(self, image: Tensor) -> Tensor:
        """What evaluation does to an image before padding: data.resize (shorter side), if the
        run used it."""
        side = self.meta["resize"]
        return TF.resize(image, side, antialias=True) if side else image

    def padded_size(self, prepared: Tensor) -> tuple[int, int]:
        """A prepared image's size rounded up to data.pad_multiple: images of one padded size
        go through in one batch, as in evaluation."""
        m = self.meta["pad_multiple"]
        return -(-prepared.shape[-2] // m) * m, -(-prepared.shape[-1] // m) * m

    def __call__(self, prepared: Sequence[Tensor], sizes: Sequence[tuple[int, int]]
                 ) -> list[tuple[Tensor, Tensor]]:
        """Prepared uint8 (3, h, w) images of one padded size and the (H, W) of the images they
        came from -> [(float32 probabilities (K, H, W), int64 labels (H, W))] on the CPU."""
        functional.set_mode(self.model, train=False)
        h, w = self.padded_size(prepared[0])
        padded = torch.tensor(self.fill, dtype=torch.uint8).view(1, 3, 1, 1).repeat(
            len(prepared), 1, h, w)
        for k, im in enumerate(prepared):
            padded[k, :, :im.shape[-2], :im.shape[-1]] = im
        x = batches.normalize(padded.to(self.device), self.meta["mean"], self.meta["std"])
        logits = self.infer(self.params, self.buffers, x)
        out = []
        for k, (im, size) in enumerate(zip(prepared, sizes)):
            one = logits[k:k + 1, :, :im.shape[-2], :im.shape[-1]]   # the padding cut off
            if tuple(one.shape[-2:]) != tuple(size):   # data.resize: back to the image's size
                one = F.interpolate(one, size=tuple(size), mode="bilinear", align_corners=False)
            probs = inference.probabilities(one)
            if probs.shape[1] == 1:   # a binary model's one logit: P(class 1)
                probs = torch.cat([1 - probs, probs], dim=1)
            out.append((probs[0].cpu(), metrics.predict(one)[0].cpu()))
        return out


def _check_state(state: dict, model: torch.nn.Module) -> None:
    for name, expected in (("params", dict(model.named_parameters())),
                           ("buffers", dict(model.named_buffers()))):
        if set(state[name]) != set(expected):
            missing = sorted(set(expected) - set(state[name]))
            extra = sorted(set(state[name]) - set(expected))
            raise ConfigError(f"the checkpoint does not hold this run's model ({name} missing: "
                              f"{missing[:3]}, unexpected: {extra[:3]})")


# ---------------------------------------------------------------- the command

def predict_run(workdir: str | os.PathLike, inputs: Sequence[str], out: str | os.PathLike,
                checkpoint: str | None = None, batch_size: int = 8, workers: int = 0,
                overlay: bool = True, probabilities: bool = False,
                defaults=None, log: Callable[[str], None] = lambda line: print(line, flush=True),
                warn: Callable[[str], None] | None = None, **eval_settings) -> dict:
    """Segments every image of `inputs` (files, folders, globs) with the run in `workdir` and
    writes the outputs (module docstring) to `out`; returns what predictions.json holds.
    checkpoint: "best", "last" (default) or a file. eval_settings: mode, window, stride, flip,
    scales (None: the run's own). Raises DataError at the end when any input failed, after
    everything else is written; ConfigError before anything is read for a bad setting."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    run = rundir.RunDir(workdir)
    cfg, meta = run.config(defaults), run.inference()
    evaluation.set_eval(cfg, **eval_settings)
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"--batch_size={batch_size} must be >= 1 and --workers={workers} "
                          ">= 0")
    if len(meta["class_names"]) > 256:
        raise ConfigError(f"{len(meta['class_names'])} classes do not fit a palette PNG (256)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out} is a file, not a folder")
    with config_errors():
        device = runtime.select_device(cfg.train.device, distributed.world_info({}))
    saved, source = evaluation.restore(run, checkpoint, device)
    predictor = Predictor(cfg, meta, saved["state"], device)
    paths, problems = collect(inputs)
    if not paths and not problems:
        raise ConfigError("no input images given")
    out.mkdir(parents=True, exist_ok=True)
    failures = [{"input": item, "error": f"{item}: {reason}"} for item, reason in problems]
    for f in failures:
        warn(f"skipped {f['error']}")
    names, results = output_names(paths), []
    start, done = time.perf_counter(), 0
    writer = _Writer(out, meta, overlay, probabilities)
    loader = torch.utils.data.DataLoader(_Inputs(paths, predictor.fill), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_as_list)
    for chunk in loader:
        read = []
        for i, image, error in chunk:
            if error is None:
                read.append((i, image))
            else:
                failures.append({"input": str(paths[i]), "error": error})
                warn(f"skipped {error}")
        groups: dict[tuple[int, int], list] = {}
        for i, image in read:   # images of one padded size go through together, as in eval
            prepared = predictor.prepare(image)
            groups.setdefault(predictor.padded_size(prepared), []).append((i, image, prepared))
        for group in groups.values():
            predicted = predictor([p for _, _, p in group],
                                  [tuple(image.shape[-2:]) for _, image, _ in group])
            group = [(i, image) for i, image, _ in group]
            for (i, image), (probs, labels) in zip(group, predicted):
                try:
                    results.append(writer.write(paths[i], names[i], image, probs, labels))
                except OSError as e:
                    failures.append({"input": str(paths[i]), "error": f"{paths[i]}: outputs "
                                     f"could not be written ({e.strerror or e})"})
                    warn(f"skipped {failures[-1]['error']}")
        done += len(chunk)
        rate = len(results) / (time.perf_counter() - start)
        log(f"{done}/{len(paths)} images  {rate:.1f} img/s  -> {out}")
    summary = {"workdir": str(run.path), "checkpoint": str(source),
               "step": int(saved["state"]["step"]), "eval": cfg.eval.to_dict(),
               "precision": cfg.train.precision, "class_names": meta["class_names"],
               "images": results, "failed": failures}
    rundir.write_json(out / SUMMARY, summary)
    log(f"{len(results)} images segmented, {len(failures)} failed -> {out / SUMMARY}")
    if failures:
        raise DataError(f"{len(failures)} of {len(paths) + len(problems)} inputs could not be "
                        f"segmented (each named above; listed in {out / SUMMARY})")
    return summary


class _Writer:
    """Writes one image's outputs, each atomically; on a failure it removes those already
    written for that image, so that an image has all its files or none."""

    def __init__(self, out: Path, meta: dict, overlay: bool, probabilities: bool):
        self.out, self.meta = out, meta
        self.overlay, self.probabilities = overlay, probabilities
        self.palette = torch.tensor(meta["palette"], dtype=torch.uint8)
        flat = [c for colour in meta["palette"] for c in colour]
        self.png_palette = flat + [0] * (768 - len(flat))

    def write(self, path: Path, name: str, image: Tensor, probs: Tensor, labels: Tensor
              ) -> dict:
        names = self.meta["class_names"]
        files_out = {"mask": self.out / f"{name}.png"}
        payloads = {"mask": lambda f: self._mask(labels).save(f, format="PNG")}
        if self.overlay:
            picture = visualize.overlay_picture(image, labels, self.palette, names).pixels
            files_out["overlay"] = self.out / f"{name}_overlay.png"
            payloads["overlay"] = lambda f: Image.fromarray(
                picture.permute(1, 2, 0).numpy()).save(f, format="PNG")
        if self.probabilities:
            files_out["probs"] = self.out / f"{name}_probs.npy"
            payloads["probs"] = lambda f: np.save(f, probs.numpy().astype(np.float32))
        written = []
        try:
            for key, target in files_out.items():
                rundir.replace_atomically(target, payloads[key], binary=True)
                written.append(target)
        except BaseException:
            for target in written:
                target.unlink(missing_ok=True)
            raise
        counts = torch.bincount(labels.flatten(), minlength=len(names)).tolist()
        total = labels.numel()
        return {"input": str(path), "size": list(labels.shape),
                **{key: str(p) for key, p in files_out.items()},
                "class_pixels": dict(zip(names, counts)),
                "class_fraction": {n: c / total for n, c in zip(names, counts)}}

    def _mask(self, labels: Tensor) -> Image.Image:
        im = Image.fromarray(labels.to(torch.uint8).numpy())   # "L", made "P" by its palette
        im.putpalette(self.png_palette)
        return im


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
