from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from seg import functional
from seg.models import PSPNet
from seg.models.weights import CLASSIFIER_KEYS, apply_backbone, cache_path, load_backbone

# The basename of torchvision's ResNet18_Weights.IMAGENET1K_V1 url.
RESNET18_V1 = "resnet18-f37072fd.pth"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private torch hub cache; the original hub dir comes back after the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path / "hub"))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(1)
    return torchvision.models.resnet18().eval()


def _pspnet18(output_stride: int = 8):
    return functional.init(lambda: PSPNet(3, backbone="resnet18", output_stride=output_stride),
                           seed=0)


def _run_backbone(model, params, buffers, x):
    sub = lambda tree: {k[len("backbone."):]: v for k, v in tree.items()  # noqa: E731
                        if k.startswith("backbone.")}
    model.eval()
    with torch.no_grad():
        return torch.func.functional_call(model.backbone, (sub(params), sub(buffers)), (x,))


def test_hub_weight_name_lands_in_pspnet(hub, tv_resnet18):
    torch.save(tv_resnet18.state_dict(), hub / RESNET18_V1)
    assert cache_path("IMAGENET1K_V1", "resnet18")[0] == hub / RESNET18_V1
    assert cache_path("DEFAULT", "resnet18")[0] == hub / RESNET18_V1
    # Output stride 32: no dilation, so torchvision's own network is the reference.
    model, params, buffers = _pspnet18(output_stride=32)
    new_params, new_buffers = apply_backbone(params, buffers,
                                             load_backbone("IMAGENET1K_V1", "resnet18"))
    x = torch.randn(2, 3, 64, 96)
    got = _run_backbone(model, new_params, new_buffers, x)
    ref = IntermediateLayerGetter(tv_resnet18, {"layer3": "layer3", "layer4": "layer4"})
    with torch.no_grad():
        want = ref(x)
    for ours, theirs in (("aux", "layer3"), ("out", "layer4")):  # PSPNet's names of the maps
        torch.testing.assert_close(got[ours], want[theirs], rtol=0, atol=0)
    # The heads keep their init; every conv of the random-init backbone was replaced (BN's
    # affine init is 1 / 0 in both, so it cannot tell).
    for k, v in params.items():
        if not k.startswith("backbone."):
            assert new_params[k] is v, k
        elif v.dim() == 4:
            assert not torch.equal(new_params[k], v), k
    torch.testing.assert_close(new_buffers["backbone.bn1.running_var"],
                               tv_resnet18.bn1.running_var, rtol=0, atol=0)


def test_vgg_classifier_is_dropped(hub):
    torch.manual_seed(0)
    sd = torchvision.models.vgg11().state_dict()
    torch.save(sd, hub / "vgg11-8a719046.pth")
    holder = nn.Module()  # a VGG encoder without the ImageNet classifier, as FCN's backbone
    holder.backbone = nn.Module()
    holder.backbone.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])
    _, params, buffers = functional.init(lambda: holder, seed=0)
    new_params, _ = apply_backbone(params, buffers, load_backbone("IMAGENET1K_V1", "vgg11"))
    assert set(new_params) == {f"backbone.{k}" for k in sd if k.startswith("features.")}
    assert set(sd) - {k[len("backbone."):] for k in new_params} == CLASSIFIER_KEYS["vgg"]
    for k, v in new_params.items():
        torch.testing.assert_close(v, sd[k[len("backbone."):]], rtol=0, atol=0)


def test_missing_hub_file_names_path_folder_field_and_url(hub):
    path = hub / "resnext50_32x4d-7cdf4587.pth"
    with pytest.raises(FileNotFoundError) as e:
        load_backbone("IMAGENET1K_V1", "resnext50_32x4d")
    message = str(e.value)
    assert "\n" not in message
    for part in (str(path), str(hub), "model.backbone_weights",
                 "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth"):
        assert part in message


def test_missing_explicit_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file .*nope.pth"):
        load_backbone(str(tmp_path / "nope.pth"), "resnet18")


@pytest.mark.parametrize("spec, arch, names", [
    ("IMAGENET1K_V2", "resnet18", "['IMAGENET1K_V1', 'DEFAULT']"),
    ("imagenet1k_v1", "vgg16", "['IMAGENET1K_V1', 'IMAGENET1K_FEATURES', 'DEFAULT']"),
])
def test_unknown_weight_name_lists_valid_names(spec, arch, names):
    with pytest.raises(ValueError) as e:
        load_backbone(spec, arch)
    assert repr(spec) in str(e.value) and names in str(e.value)


def test_unknown_arch_and_empty_spec():
    with pytest.raises(ValueError, match="arch='resnet9'"):
        load_backbone("IMAGENET1K_V1", "resnet9")
    with pytest.raises(ValueError, match="random init"):
        load_backbone("", "resnet18")


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3},
                                  lambda sd: {"model": sd, "optimizer": {}}])
def test_explicit_file_and_wrappers(tmp_path, tv_resnet18, wrap):
    sd = tv_resnet18.state_dict()
    path = tmp_path / "weights.pt"
    torch.save(wrap(sd), path)
    loaded = load_backbone(str(path), "resnet18")
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
        assert loaded[k].device.type == "cpu"


def test_corrupt_or_foreign_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth is not a readable torch state_dict"):
        load_backbone(str(garbage), "resnet18")
    pickled = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "obj": nn.ReLU()}, pickled)  # weights_only refuses modules
    with pytest.raises(ValueError, match="pickled.pth is not a readable"):
        load_backbone(str(pickled), "resnet18")
    not_sd = tmp_path / "numbers.pth"
    torch.save({"lr": 0.1}, not_sd)
    with pytest.raises(ValueError, match="numbers.pth does not hold a state_dict"):
        load_backbone(str(not_sd), "resnet18")


def test_missing_unused_and_misshapen_keys_are_named(tv_resnet18):
    _, params, buffers = _pspnet18()
    sd = tv_resnet18.state_dict()
    missing = {k: v for k, v in sd.items() if k != "layer2.1.conv2.weight"}
    with pytest.raises(ValueError, match=r"missing layer2\.1\.conv2\.weight; not in the "
                                         r"encoder none"):
        apply_backbone(params, buffers, missing)
    extra = {**sd, "layer5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing none; not in the encoder layer5\.0\.conv1"):
        apply_backbone(params, buffers, extra)
    wrong = {**sd, "layer1.0.bn1.running_mean": torch.zeros(65)}
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1\.running_mean: loaded \(65,\) vs "
                                         r"model \(64,\)"):
        apply_backbone(params, buffers, wrong)
    with pytest.raises(ValueError, match="prefix='encoder.'"):
        apply_backbone(params, buffers, sd, prefix="encoder.")


def test_old_checkpoints_without_batch_counters_load(tv_resnet18):
    _, params, buffers = _pspnet18()
    sd = {k: v for k, v in tv_resnet18.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    _, new_buffers = apply_backbone(params, buffers, sd)
    assert torch.equal(new_buffers["backbone.bn1.num_batches_tracked"],
                       buffers["backbone.bn1.num_batches_tracked"])
    torch.testing.assert_close(new_buffers["backbone.bn1.running_mean"],
                               sd["bn1.running_mean"], rtol=0, atol=0)


def test_apply_is_pure_and_casts(tv_resnet18):
    _, params, buffers = _pspnet18()
    before = {k: v.clone() for k, v in {**params, **buffers}.items()}
    sd = {k: v.double() if v.is_floating_point() else v
          for k, v in tv_resnet18.state_dict().items()}
    sd_before = {k: v.clone() for k, v in sd.items()}
    new_params, new_buffers = apply_backbone(params, buffers, sd)
    for k, v in {**params, **buffers}.items():
        assert torch.equal(v, before[k]), k
    for k, v in sd.items():
        assert torch.equal(v, sd_before[k]), k
    w = new_params["backbone.conv1.weight"]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, sd["conv1.weight"].float(), rtol=0, atol=0)
    assert new_buffers["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    # Copies, so that a donating train step cannot overwrite the loaded state_dict.
    sd32 = tv_resnet18.state_dict()
    new_params, _ = apply_backbone(params, buffers, sd32)
    assert new_params["backbone.conv1.weight"].data_ptr() != sd32["conv1.weight"].data_ptr()
