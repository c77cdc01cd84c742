"""Segmenting new images (seg.predict, experiments/predict.py) with a tiny trained run: the
masks are the run's own eval forward, any input a user has is read the way a viewer shows it,
and a bad input is named, skipped and leaves nothing half-written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from configs import common
from conftest import tiny_unet, trained_tiny_unet
from seg import data, errors, experiment, functional, metrics, predict, rundir
from seg import visualize
from seg.data import batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


tiny_config = tiny_unet


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_synthetic_data, one_thread):
    return trained_tiny_unet(tmp_path_factory)


def test_the_run_directory_holds_what_inference_needs(run_dir):
    meta = rundir.RunDir(run_dir).inference()
    info = data.build(tiny_config().data, "train").info
    assert meta["class_names"] == list(info.class_names) == ["background", "striped_blob",
                                                             "patterned_polygon"]
    assert meta["palette"] == [list(c) for c in info.palette]
    assert meta["mean"] == list(info.mean) and meta["std"] == list(info.std)
    assert (meta["num_outputs"], meta["ignore_index"], meta["pad_multiple"]) == (3, 255, 32)
    assert meta["model"] == {"name": "unet", "base_channels": 4, "depth": 2, "bilinear": False,
                             "dropout": 0.5}
    assert meta["eval"]["mode"] == "whole" and meta["precision"] == "fp32"


def test_masks_are_the_runs_eval_predictions(run_dir, tmp_path):
    """Val images saved as PNGs and predicted give the masks and probabilities of the run's own
    eval forward on the same images (same batch, so bitwise)."""
    cfg = tiny_config()
    val = data.build(cfg.data, "val")
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(len(val)):
        Image.fromarray(val.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    summary = predict.predict_run(run_dir, [str(folder)], tmp_path / "out", batch_size=6,
                                  probabilities=True, defaults=common.get_base_config(),
                                  log=lambda line: None)
    exp = experiment.build(cfg, "cpu", with_data=False, pretrained=False)
    functional.set_mode(exp.model, train=False)
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000003.pt", weights_only=True)["state"]
    images, _ = next(batches.eval_batches(val, None, 6, pad_multiple=32))
    logits = experiment.infer(cfg, exp.model)(state["params"], state["buffers"], images)
    assert [r["input"] for r in summary["images"]] == [str(folder / f"{i}.png") for i in range(6)]
    for i, record in enumerate(summary["images"]):
        mask = np.array(Image.open(record["mask"]))
        assert torch.equal(torch.from_numpy(mask).long(), metrics.predict(logits)[i])
        probs = np.load(record["probs"])
        assert probs.dtype == np.float32 and probs.shape == (3, 32, 32)
        assert torch.equal(torch.from_numpy(probs), torch.softmax(logits[i], 0))
        counts = np.bincount(mask.ravel(), minlength=3)
        assert list(record["class_pixels"].values()) == counts.tolist()
        assert sum(record["class_fraction"].values()) == pytest.approx(1.0)


def write_inputs(folder: Path) -> dict:
    """A grayscale PNG, an RGB JPEG of another size, an RGBA PNG, a palette PNG, a 16-bit PNG,
    a text file (ignored in a folder) and a corrupt PNG; returns each one's (H, W)."""
    g = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(g.integers(0, 256, (40, 50), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(g.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    Image.fromarray(g.integers(0, 256, (30, 20, 4), dtype=np.uint8)).save(folder / "rgba.png")
    paletted = Image.fromarray(g.integers(0, 4, (33, 31), dtype=np.uint8))
    paletted.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 90, 90, 90])
    paletted.save(folder / "palette.png")
    Image.fromarray(g.integers(0, 65536, (25, 27), dtype=np.uint16)).save(folder / "deep.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "corrupt.png").write_bytes((folder / "gray.png").read_bytes()[:120])
    return {"gray": (40, 50), "photo": (37, 45), "rgba": (30, 20), "palette": (33, 31),
            "deep": (25, 27)}


def test_predict_command_on_a_folder_with_a_corrupt_file(run_dir, tmp_path):
    sizes = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "experiments/predict.py", f"--workdir={run_dir}", str(tmp_path / "in"),
         f"--out={out}", "--checkpoint=best"], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    named = [line for line in lines if "corrupt.png" in line]
    assert len(named) == 1 and "truncated" in named[0], proc.stderr
    assert lines[-1].startswith("error: 1 of 6 inputs could not be segmented")
    meta = rundir.RunDir(run_dir).inference()
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / "best_00000003.pt")
    assert [f["input"] for f in summary["failed"]] == [str(tmp_path / "in" / "corrupt.png")]
    assert sorted(Path(r["input"]).stem for r in summary["images"]) == sorted(sizes)
    for record in summary["images"]:
        stem = Path(record["input"]).stem
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.mode == "P" and mask.size[::-1] == sizes[stem]
            assert mask.getpalette()[:9] == [c for colour in meta["palette"] for c in colour]
            values = np.asarray(mask)
        assert values.max() < 3 and record["size"] == list(sizes[stem])
        assert sum(record["class_pixels"].values()) == sizes[stem][0] * sizes[stem][1]
        with Image.open(out / f"{stem}_overlay.png") as overlay:   # two panels, enlarged
            factor = visualize.upscale_factor(*sizes[stem])
            assert overlay.mode == "RGB" and overlay.width == 2 * sizes[stem][1] * factor + 6
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.png" for s in sizes] + [f"{s}_overlay.png" for s in sizes] + ["predictions.json"])


def test_inputs_are_read_as_a_viewer_shows_them(tmp_path):
    g = np.random.default_rng(1)
    rgb = g.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb).permute(2, 0, 1)

    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert torch.equal(predict.read_input(tmp_path / "grey.png"),
                       torch.from_numpy(grey).expand(3, 6, 5))

    alpha = np.array([0, 255, 128, 64, 200] * 6, dtype=np.uint8).reshape(6, 5)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    background = (10, 200, 30)
    a = torch.from_numpy(alpha).int()
    bg = torch.tensor(background).view(3, 1, 1)
    # over the background, rounded: (src * a + bg * (255 - a)) / 255, PIL's alpha_composite
    want = ((expected.int() * a + bg * (255 - a)) / 255).round().to(torch.uint8)
    assert torch.equal(predict.read_input(tmp_path / "rgba.png", background), want)

    paletted = Image.fromarray(g.integers(0, 3, (6, 5), dtype=np.uint8))
    paletted.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    paletted.save(tmp_path / "p.png")
    assert torch.equal(predict.read_input(tmp_path / "p.png"),
                       torch.from_numpy(np.array(paletted.convert("RGB"))).permute(2, 0, 1))

    deep = np.array([[0, 1, 128, 129, 257, 32767, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    # the full 16-bit range onto 8 bits, rounded: v * 255 / 65535 = v / 257
    assert predict.read_input(tmp_path / "deep.png")[0, 0].tolist() == [0, 0, 0, 1, 1, 127,
                                                                        128, 255]

    # EXIF orientation 6: the camera was turned, the viewer rotates the picture 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    upright = predict.read_input(tmp_path / "turned.jpg")
    stored = torchvision.io.decode_jpeg(torchvision.io.read_file(str(tmp_path / "turned.jpg")))
    assert upright.shape == (3, 5, 6)
    assert torch.equal(upright, torch.rot90(stored, k=-1, dims=(1, 2)))   # 90 degrees clockwise

    Image.fromarray(rgb[..., 0].astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(errors.DataError, match=r"float.tif: mode F \(1 channel\) is not an image"):
        predict.read_input(tmp_path / "float.tif")
    with pytest.raises(errors.DataError, match=r"missing.png: cannot read"):
        predict.read_input(tmp_path / "missing.png")


def test_inputs_are_files_folders_and_globs(tmp_path):
    for rel in ("a/x.png", "a/y.JPG", "a/readme.txt", "b/x.png", "c.bmp"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found, problems = predict.collect([str(tmp_path / "a"), str(tmp_path / "*/x.png"),
                                       str(tmp_path / "c.bmp"), str(tmp_path / "nope"),
                                       str(tmp_path / "*.gif")])
    found = [p.relative_to(tmp_path).as_posix() for p in found]
    assert found == ["a/x.png", "a/y.JPG", "b/x.png", "c.bmp"]
    assert problems == [(str(tmp_path / "nope"), "no such file or folder"),
                        (str(tmp_path / "*.gif"), "matches no file")]
    assert predict.output_names([tmp_path / p for p in found]) == ["x", "y", "x-2", "c"]


def test_a_failed_write_leaves_no_part_of_an_image(run_dir, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((8, 9, 3), 90, np.uint8)).save(folder / f"{name}.png")

    def disk_full(f, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict.np, "save", disk_full)   # the last file of each image fails
    with pytest.raises(errors.DataError, match="2 of 2 inputs could not be segmented"):
        predict.predict_run(run_dir, [str(folder)], tmp_path / "out", probabilities=True,
                            defaults=common.get_base_config(), log=lambda line: None,
                            warn=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.json"]
    failed = json.loads((tmp_path / "out" / "predictions.json").read_text())["failed"]
    assert [f["error"] for f in failed] == [
        f"{folder / n}.png: outputs could not be written (No space left on device)"
        for n in ("a", "b")]


def test_a_run_that_resized_predicts_at_its_scale_and_returns_each_images_size(run_dir):
    cfg = tiny_config()
    meta = {**rundir.RunDir(run_dir).inference(), "resize": 16}
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000003.pt", weights_only=True)["state"]
    predictor = predict.Predictor(cfg, meta, state, torch.device("cpu"))
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    prepared = predictor.prepare(image)
    assert prepared.shape == (3, 16, 20) and predictor.padded_size(prepared) == (32, 32)
    [(probs, labels)] = predictor([prepared], [(40, 50)])
    assert probs.shape == (3, 40, 50) and labels.shape == (40, 50)
    assert torch.equal(labels, probs.argmax(0))


def test_bad_settings_are_one_line_errors(run_dir, tmp_path):
    base = common.get_base_config()
    with pytest.raises(errors.ConfigError, match="--checkpoint=nope.pt is not a file"):
        predict.predict_run(run_dir, ["x.png"], tmp_path, checkpoint="nope.pt", defaults=base)
    with pytest.raises(errors.ConfigError, match="eval.stride"):
        predict.predict_run(run_dir, ["x.png"], tmp_path, defaults=base, mode="slide",
                            window=("8", "8"), stride=("16", "16"))
    old = tmp_path / "old"   # a run made before inference.json existed
    old.mkdir()
    (old / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(errors.ConfigError, match="inference.json does not exist .*run train.py"):
        predict.predict_run(old, ["x.png"], tmp_path / "out", defaults=base)
