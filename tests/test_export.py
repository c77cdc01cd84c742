"""Exporting a trained run (seg.export, experiments/export.py): the weights file loads strictly
into the plain nn.Module and gives the run's own eval logits, the torch.export program gives
them at other sizes too, and a file that does not reproduce them is never written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seg.models
from configs import common
from conftest import tiny_unet, trained_tiny_unet
from seg import data, errors, experiment, export, functional
from seg.data import batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


tiny_config = tiny_unet


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_synthetic_data, one_thread):
    return trained_tiny_unet(tmp_path_factory)


def runs_own_eval(run_dir, images):
    """The logits of the run's eval forward (seg.experiment.infer) from its last checkpoint."""
    cfg = tiny_config()
    exp = experiment.build(cfg, "cpu", with_data=False, pretrained=False)
    functional.set_mode(exp.model, train=False)
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000003.pt", weights_only=True)["state"]
    return experiment.infer(cfg, exp.model)(state["params"], state["buffers"], images)


def val_images():
    val = data.build(tiny_config().data, "val")
    return next(batches.eval_batches(val, None, 6, pad_multiple=32))[0]


def test_weights_and_program_give_the_runs_own_logits(run_dir, tmp_path):
    lines = []
    record = export.export_run(run_dir, tmp_path / "export", formats=("weights", "program"),
                               defaults=common.get_base_config(), log=lines.append)
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "inference.json",
                                                     "model.pt2", "weights.pt"]
    images = val_images()
    want = runs_own_eval(run_dir, images)

    # the README's snippet, verbatim
    spec = json.load(open(out / "inference.json"))
    model = seg.models.build(spec["model"], spec["num_outputs"]).eval()
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(model(images)["out"], want)   # same kernels on the same tensors

    saved = torch.load(out / "weights.pt", weights_only=True)
    assert set(saved) == set(model.state_dict())   # params and buffers, no optimizer state

    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        got = program(images)
        # the exported graph may fuse or decompose float32 ops differently (seg/export.py)
        assert (got - want).abs().max() <= export.RELATIVE_TOLERANCE * want.abs().max()
        # other batch sizes and image sizes (multiples of pad_multiple): dynamic shapes
        other = torch.randn(3, 3, 64, 96)
        model_out = model(other)["out"]
        assert (program(other) - model_out).abs().max() <= \
            export.RELATIVE_TOLERANCE * model_out.abs().max()
    assert record["shapes"]["program"] == "dynamic batch, height and width"
    assert record["step"] == 3 and record["max_diff"]["weights"] == 0.0
    assert lines[0] == (f"weights: {out / 'weights.pt'} (any shape the network takes; largest "
                        "logit difference 0)")


def test_without_onnx_the_other_files_are_written_and_asking_for_it_is_an_error(
        run_dir, tmp_path, monkeypatch):
    # as on a machine without onnx, even where it is installed
    monkeypatch.setattr(export, "missing_onnx_packages", lambda: ["onnx"])
    lines = []
    record = export.export_run(run_dir, tmp_path / "default", formats=("weights", "onnx"),
                               defaults=common.get_base_config(), log=lines.append)
    assert lines[-1] == "onnx: skipped, needs the optional packages onnx (pip install onnx " \
                        "onnxscript onnxruntime)"
    assert sorted(record["files"]) == ["weights"] and "onnx" in record["skipped"]
    with pytest.raises(errors.ConfigError, match=r"--formats=onnx: needs the optional packages "
                       r"onnx \(pip install onnx onnxscript onnxruntime\) \(the other files"):
        export.export_run(run_dir, tmp_path / "asked", formats=("weights", "onnx"),
                          onnx_required=True, defaults=common.get_base_config(),
                          log=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "asked").iterdir()) == [
        "export.json", "inference.json", "weights.pt"]


def test_a_file_that_does_not_reproduce_the_run_is_not_written(run_dir, tmp_path, monkeypatch):
    real = export._reference

    def off_by_a_little(meta, state):   # as if the exported network had lost a layer's bias
        forward = real(meta, state)
        return lambda x: forward(x) + 1e-2

    monkeypatch.setattr(export, "_reference", off_by_a_little)
    with pytest.raises(errors.ConfigError, match=r"weights export differs from the run's forward "
                       r"by 0.01 .* not written"):
        export.export_run(run_dir, tmp_path, formats=("weights",),
                          defaults=common.get_base_config(), log=lambda line: None)
    assert not (tmp_path / "weights.pt").exists() and not list(tmp_path.glob(".*.tmp"))


def test_export_command_best_checkpoint(run_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "experiments/export.py", f"--workdir={run_dir}", f"--out={tmp_path}",
         "--checkpoint=best", "--formats=weights"], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "export.json").read_text())
    assert record["checkpoint"].endswith("best_00000003.pt")
    assert "weights: " in proc.stdout and sorted(record["files"]) == ["weights"]


def test_a_graph_that_fixes_the_image_size_is_exported_at_the_example_size(
        run_dir, tmp_path, monkeypatch):
    real = export._program_file

    def size_fixed(model, example, free):   # as ONNX's adaptive pooling in PSPNet does
        data, program = real(model, example, free)

        def run(x):
            if x.shape[-2:] != example.shape[-2:]:
                raise RuntimeError(f"Guard failed: height == {example.shape[-2]}")
            return program(x)
        return data, run

    monkeypatch.setattr(export, "_program_file", size_fixed)
    record = export.export_run(run_dir, tmp_path, formats=("program",),
                               defaults=common.get_base_config(), log=lambda line: None)
    assert record["shapes"]["program"] == "dynamic batch; height and width fixed at 32x32"
    assert (tmp_path / "model.pt2").exists() and record["failed"] == {}
