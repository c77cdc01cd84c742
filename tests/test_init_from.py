"""model.init_from (seg/init_from.py): a run started from another run's weights or from
torchvision's segmentation weights, strictly, with the classifier layers re-initialised (and
named) when the number of classes differs."""
from __future__ import annotations

import pytest
import torch
import torchvision

from configs import deeplabv3, fcn_resnet50
from conftest import tiny_unet
from seg import errors, experiment, functional, init_from, loop
from seg.models import FCNResNet

pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


def tiny_config(num_classes=3, steps=3):
    return tiny_unet(data__num_classes=num_classes, train__steps=steps, train__log_every=steps)


@pytest.fixture(scope="module")
def source(tmp_path_factory, shared_synthetic_data, one_thread):
    workdir = tmp_path_factory.mktemp("run") / "three"
    loop.train_and_evaluate(tiny_config(3), workdir)
    return workdir


def test_a_3_class_run_starts_a_2_class_run(source, tmp_path, capsys):
    cfg = tiny_config(2, steps=2)
    cfg.model.init_from = str(source)
    summary = loop.train_and_evaluate(cfg, tmp_path / "two")
    out = capsys.readouterr().out
    assert f"init_from {source} (step 3): 64 tensors loaded" in out
    assert "re-initialised for 2 outputs (the source has 3): outc.bias, outc.weight" in out
    assert summary["model"]["init_from"]["reinitialised"] == ["outc.bias", "outc.weight"]
    assert summary["last_eval"]["test"]["step"] == 2   # it trained and evaluated

    # what it started from: the source's tensors, and the fresh init for the classifier
    start = experiment.build(cfg, "cpu", with_data=False)
    fresh = experiment.build(tiny_config(2, steps=2), "cpu", with_data=False)
    saved = torch.load(source / "checkpoints" / "ckpt_00000003.pt", weights_only=True)["state"]
    for part in ("params", "buffers"):
        for k, v in getattr(start, part).items():
            want = getattr(fresh, part)[k] if k.startswith("outc.") else saved[part][k]
            assert torch.equal(v, want), k


def test_the_same_classes_load_every_tensor_from_a_weights_file(source, tmp_path):
    best = sorted((source / "checkpoints").glob("best_*.pt"))[-1]
    cfg = tiny_config(3)
    cfg.model.init_from = str(best)
    start = experiment.build(cfg, "cpu", with_data=False)
    assert start.init_report.reinitialised == [] and start.init_report.loaded == 66
    saved = torch.load(best, weights_only=True)["state"]["params"]
    assert all(torch.equal(start.params[k], v) for k, v in saved.items())
    # a plain state_dict file (experiments/export.py's weights.pt) loads the same way
    torch.save({**saved, **torch.load(best, weights_only=True)["state"]["buffers"]},
               tmp_path / "weights.pt")
    cfg.model.init_from = str(tmp_path / "weights.pt")
    again = experiment.build(cfg, "cpu", with_data=False)
    assert all(torch.equal(again.params[k], v) for k, v in start.params.items())


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A private TORCH_HOME with an empty hub cache; nothing may be downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def test_torchvision_fcn_resnet50_from_the_hub_cache(torch_home):
    torch.manual_seed(0)
    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                                      num_classes=21, aux_loss=True)
    # the file name torchvision's COCO_WITH_VOC_LABELS_V1 weights are cached under
    torch.save(tv.state_dict(), torch_home / "fcn_resnet50_coco-1167a1af.pth")
    cfg = fcn_resnet50.get_config()   # ResNet-50, 3 classes on the embedded dataset
    cfg.model.init_from = "fcn_resnet50"
    cfg.data.normalize = "imagenet"
    exp = experiment.build(cfg, "cpu", with_data=False)
    heads = ["aux_classifier.4.bias", "aux_classifier.4.weight", "classifier.4.bias",
             "classifier.4.weight"]
    assert exp.init_report.reinitialised == heads and exp.init_report.classes == (21, 3)
    assert exp.init_report.source == ("torchvision fcn_resnet50 COCO_WITH_VOC_LABELS_V1 "
                                      "(fcn_resnet50_coco-1167a1af.pth)")
    tv_state = tv.state_dict()
    for k, v in {**exp.params, **exp.buffers}.items():
        if k not in heads:
            assert torch.equal(v, tv_state[k]), k
    assert exp.params["classifier.4.weight"].shape == (3, 512, 1, 1)

    # with its own 21 classes, our model with the loaded weights is torchvision's network
    model, params, buffers = functional.init(lambda: FCNResNet(21), seed=0)
    params, buffers, report = init_from.apply(params, buffers,
                                              init_from.load_source("fcn_resnet50"), 21)
    assert report.reinitialised == [] and report.loaded == len(tv_state)
    x = torch.randn(1, 3, 48, 64)
    model.eval()
    with torch.no_grad():
        got = functional.apply(model, params, buffers, x)[0]
        want = tv.eval()(x)
    # the same float32 operations in the same order: equal up to summation-order differences
    # of the convolution kernels, ~1e-6 of the logits' scale
    for key in ("out", "aux"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_a_missing_torchvision_file_names_the_file_and_url(torch_home):
    cfg = deeplabv3.get_config()
    cfg.model.init_from, cfg.model.backbone = "deeplabv3_resnet50", "resnet50"
    with pytest.raises(errors.ConfigError) as e:
        experiment.build(cfg, "cpu", with_data=False)
    message = str(e.value)
    assert str(torch_home / "deeplabv3_resnet50_coco-cd0a2569.pth") in message
    assert "https://download.pytorch.org/models/deeplabv3_resnet50_coco-cd0a2569.pth" in message
    assert "nothing is downloaded" in message


def test_what_does_not_fit_is_refused_naming_it(source, tmp_path):
    wider = tiny_config(3)
    wider.model.base_channels, wider.model.init_from = 8, str(source)
    with pytest.raises(errors.ConfigError, match=r"shapes differ beyond the number of classes: "
                       r"inc.0.weight: \(4, 3, 3, 3\) vs the model's \(8, 3, 3, 3\)"):
        experiment.build(wider, "cpu", with_data=False)
    deeper = tiny_config(3)
    deeper.model.depth, deeper.model.init_from = 3, str(source)
    with pytest.raises(errors.ConfigError, match=r"do not fit the model: missing downs.2.1.0."
                       r"weight, .* and 17 more; not in the model none"):
        experiment.build(deeper, "cpu", with_data=False)
    both = tiny_config(3)
    both.model.init_from, both.model.backbone_weights = str(source), "IMAGENET1K_V1"
    with pytest.raises(errors.ConfigError, match="are both set"):
        experiment.check(both)
    nothing = tiny_config(3)
    nothing.model.init_from = str(tmp_path / "nope")
    with pytest.raises(errors.ConfigError, match="no such run directory or file"):
        experiment.build(nothing, "cpu", with_data=False)


def test_an_auxiliary_head_the_model_lacks_is_dropped_and_named():
    _, params, buffers = functional.init(lambda: FCNResNet(3, backbone="resnet18"), seed=0)
    source = init_from.Source({**params, **buffers}, "an aux run")
    _, p2, b2 = functional.init(lambda: FCNResNet(3, backbone="resnet18", aux=False), seed=1)
    new_params, _, report = init_from.apply(p2, b2, source, 3)
    assert report.dropped and all(k.startswith("aux_classifier.") for k in report.dropped)
    assert "dropped the source's auxiliary head" in "\n".join(report.lines())
    assert all(torch.equal(v, params[k]) for k, v in new_params.items())
