"""seg.models.backbones: every family of torchvision classifiers as a multi-scale encoder under
torchvision's names, against torchvision's own modules; dilation; stochastic depth through the
pure functional path (train, eval, frozen, recomputed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torch import fx
from torchvision.ops import StochasticDepth

from seg import functional, losses, optim
from seg import train as seg_train
from seg.models import backbones
from seg.models.weights import apply_backbone

# One network per family: its levels (the torchvision module each is read from) and widths,
# written out from torchvision's definitions. MobileNets: the strided blocks (`_is_cn`) that
# torchvision's own LR-ASPP / DeepLabV3 / SSDlite read, the last layer for c5.
FAMILIES = {
    "resnet18": ({"c1": "relu", "c2": "layer1", "c3": "layer2", "c4": "layer3", "c5": "layer4"},
                 (64, 64, 128, 256, 512)),
    "mobilenet_v3_large": ({"c1": "features.0", "c2": "features.2", "c3": "features.4",
                            "c4": "features.7", "c5": "features.16"}, (16, 24, 40, 80, 960)),
    "mobilenet_v2": ({"c1": "features.0", "c2": "features.2", "c3": "features.4",
                      "c4": "features.7", "c5": "features.18"}, (32, 24, 32, 64, 1280)),
    "efficientnet_b0": ({"c1": "features.1", "c2": "features.2", "c3": "features.3",
                         "c4": "features.5", "c5": "features.8"}, (16, 24, 40, 112, 1280)),
    "efficientnet_v2_s": ({"c1": "features.1", "c2": "features.2", "c3": "features.3",
                           "c4": "features.5", "c5": "features.7"}, (24, 48, 64, 160, 1280)),
    "convnext_tiny": ({"c2": "features.1", "c3": "features.3", "c4": "features.5",
                       "c5": "features.7"}, (96, 192, 384, 768)),
    "swin_t": ({"c2": "features.1", "c3": "features.3", "c4": "features.5", "c5": "features.7"},
               (96, 192, 384, 768)),
    "swin_v2_t": ({"c2": "features.1", "c3": "features.3", "c4": "features.5",
                   "c5": "features.7"}, (96, 192, 384, 768)),
    "regnet_y_400mf": ({"c1": "stem", "c2": "trunk_output.block1", "c3": "trunk_output.block2",
                        "c4": "trunk_output.block3", "c5": "trunk_output.block4"},
                       (32, 48, 104, 208, 440)),
    "shufflenet_v2_x0_5": ({"c1": "conv1", "c2": "maxpool", "c3": "stage2", "c4": "stage3",
                            "c5": "conv5"}, (24, 24, 48, 96, 1024)),
}


class Holder(nn.Module):
    """A model whose `backbone` is the encoder, as in every segmentation model."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


def _perturbed(state_dict: dict) -> dict:
    """torchvision-shaped weights unlike a fresh init (BN statistics included), so that a tensor
    loaded into the wrong place shows."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state_dict.items():
        if not v.is_floating_point():
            out[k] = v
        elif k.endswith("running_var"):
            out[k] = v * torch.empty(v.shape).uniform_(0.5, 2.0, generator=g)
        else:
            out[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_levels_are_torchvisions_modules_and_its_weights_load_strictly(name):
    taps, widths = FAMILIES[name]
    assert backbones.channels(name) == dict(zip(taps, widths))
    levels = {level: level for level in taps}
    model, params, buffers = functional.init(lambda: Holder(backbones.encoder(name, levels)), 0)
    # torchvision's network on the meta device, given weights of its own (classifier included)
    # that differ from ours; apply_backbone must take all but the classifier (CLASSIFIER_KEYS).
    with torch.device("meta"):
        ref = torchvision.models.get_model(name) if not name.startswith("regnet") else None
    if ref is None:  # RegNet computes its widths with tensor ops, which meta cannot read back
        ref = torchvision.models.get_model(name)
    ours = {k[len("backbone."):]: v for k, v in {**params, **buffers}.items()}
    full = _perturbed({k: ours.get(k, torch.randn(v.shape)) for k, v in ref.state_dict().items()})
    ref.load_state_dict(full, strict=True, assign=True)
    params, buffers = apply_backbone(params, buffers, full)
    seen = {}
    for level, path in taps.items():
        ref.get_submodule(path).register_forward_hook(
            lambda m, i, out, level=level: seen.__setitem__(level, out))
    x = torch.randn(2, 3, 65, 49)  # odd sizes: each stage's rounding must be torchvision's
    model.eval()
    ref.eval()
    with torch.no_grad():
        ref(x)
        got, _ = functional.apply(model.backbone, *_sub(params, buffers), x)
    assert list(got) == list(taps)
    for level in taps:
        want = seen[level].permute(0, 3, 1, 2) if name.startswith("swin") else seen[level]
        # the same modules in the same order: the same kernels, bitwise
        torch.testing.assert_close(got[level], want, rtol=0, atol=0)
        assert got[level].shape[1] == backbones.channels(name)[level]


def _sub(params, buffers):
    strip = lambda tree: {k[len("backbone."):]: v for k, v in tree.items()}  # noqa: E731
    return strip(params), strip(buffers)


def _convs(net: nn.Module) -> dict[str, tuple]:
    return {n: (m.stride, m.dilation, m.padding) for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d)}


def test_mobilenet_v3_dilation_is_torchvisions():
    # torchvision's dilated MobileNetV3 (its segmentation models' encoder) gives every conv of
    # the last stage rate 2, the formerly strided one included (Family.dilation "output").
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v3_large(dilated=True).features.eval()
    ours = backbones.encoder("mobilenet_v3_large", {"c3": "low", "c5": "high"}, 16).eval()
    theirs = {f"features.{k}": v for k, v in _convs(ref).items()}
    assert _convs(ours) == theirs
    assert any(d == (2, 2) for _, d, _ in theirs.values())
    ours.load_state_dict({f"features.{k}": v for k, v in ref.state_dict().items()}, strict=True)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["high"], ref(x), rtol=0, atol=0)


def test_dilation_keeps_every_kernels_reach():
    # A network of convolutions, BN and ReLU only (RegNet-X: no squeeze-excitation, whose global
    # pool would see the denser map) computes at output stride 8 what it computes at 32, on a
    # 4x denser grid: c5 at OS 8 read every 4th pixel equals c5 at OS 32 (a trous, Chen et al.).
    torch.manual_seed(0)
    coarse = backbones.encoder("regnet_x_400mf", {"c5": "c5"}).eval()
    dense = backbones.encoder("regnet_x_400mf", {"c5": "c5"}, output_stride=8).eval()
    dense.load_state_dict(_perturbed(coarse.state_dict()), strict=True)
    coarse.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(1, 3, 96, 64)  # multiples of 32: no rounding at any stride
    with torch.no_grad():
        want, got = coarse(x)["c5"], dense(x)["c5"]
    assert got.shape[-2:] == (12, 8) and want.shape[-2:] == (3, 2)
    # Same products, summed in another order by another kernel: float32 rounding of sums of a
    # few thousand O(1) terms, ~1e-6 relative per layer over 22 layers.
    torch.testing.assert_close(got[..., ::4, ::4], want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("name", ["convnext_tiny", "swin_t"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_patchify_families_refuse_dilation(name, output_stride):
    with torch.device("meta"), pytest.raises(ValueError, match=f"output_stride={output_stride}"):
        backbones.encoder(name, {"c5": "c5"}, output_stride)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="vit_b_16"), "name='vit_b_16'"), (dict(name="densenet121"), "densenet121"),
    (dict(name="resnet9"), "resnet9"), (dict(name="convnext_tiny", levels={"c1": "c1"}), "c1"),
    (dict(drop_path=0.1), "no stochastic depth"),
    (dict(name="swin_t", drop_path=1.0), r"drop_path=1\.0")])
def test_bad_arguments_are_named(kwargs, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        backbones.encoder(**{"name": "resnet18", "levels": {"c5": "c5"}, **kwargs})


def _rates(net: nn.Module) -> list[float]:
    return [m.p for m in net.modules() if isinstance(m, StochasticDepth)]


def test_drop_path_scales_torchvisions_schedule():
    with torch.device("meta"):
        # ConvNeXt: drop_path is torchvision's stochastic_depth_prob, block i of n gets i/(n-1)
        ours = backbones.encoder("convnext_tiny", {"c5": "c5"}, drop_path=0.4)
        theirs = torchvision.models.convnext_tiny(stochastic_depth_prob=0.4)
        assert _rates(ours) == pytest.approx(_rates(theirs), abs=1e-12)
        swin = _rates(backbones.encoder("swin_t", {"c5": "c5"}, drop_path=0.3))
        assert swin == pytest.approx([0.3 * i / 11 for i in range(12)], abs=1e-12)
        # EfficientNet's own schedule is i/n: drop_path is still the deepest block's rate
        eff = _rates(backbones.encoder("efficientnet_b0", {"c5": "c5"}, drop_path=0.1))
        assert eff == pytest.approx([0.1 * i / 15 for i in range(16)], abs=1e-12)
        assert backbones.encoder("resnet18", {"c5": "c5"}, drop_path=0.0) is not None


def test_output_norms_only_where_stages_are_unnormalised():
    assert backbones.output_norms("resnet18", {"c5": "out"}) is None
    assert backbones.output_norms("mobilenet_v3_large", {"c5": "out"}) is None
    for name in ("convnext_tiny", "swin_t"):
        norms = backbones.output_norms(name, {"c2": "a", "c5": "b"})
        assert list(norms) == ["a", "b"]
        assert [n.normalized_shape for n in norms.values()] == [(96,), (768,)]


def test_the_graph_is_plain_and_mode_switches_keep_it():
    # A DualGraphModule would regenerate its code on every train/eval switch (and torch.compile
    # would trace again); the encoder's one graph serves both modes.
    with torch.device("meta"):
        net = backbones.encoder("swin_t", {"c5": "c5"})
    assert type(net).__mro__[1] is fx.GraphModule
    code = net.code
    net.eval()
    net.train()
    assert net.code == code
    assert isinstance(net.features, nn.Sequential)  # whole torchvision containers are kept


# --- stochastic depth through the pure path (test-sized torchvision networks, conftest) ------

def _tiny(name, drop_path):
    """A model holding a test-sized network (conftest.TINY_NETS) under `backbone`."""
    return functional.init(
        lambda: Holder(backbones.encoder(name, {"c3": "c3", "c5": "c5"}, drop_path=drop_path)),
        seed=0)


def _c5(model, params, buffers, x, seed, train=True, frozen=()):
    functional.set_mode(model, train, frozen)
    torch.manual_seed(seed)
    with torch.no_grad():
        return functional.apply(model.backbone, *_sub(params, buffers), x)[0]["c5"]


@pytest.mark.usefixtures("tiny_encoders")
def test_stochastic_depth_follows_the_seed_the_mode_and_freezing():
    model, params, buffers = _tiny("swin_t", 0.5)
    x = torch.randn(4, 3, 32, 32)
    run = lambda seed, **kw: _c5(model, params, buffers, x, seed, **kw)  # noqa: E731
    a = run(1)
    assert torch.equal(a, run(1))             # the global RNG, seeded: reproducible
    assert not torch.equal(a, run(2))         # another draw drops other blocks
    evaluated = run(1, train=False)
    assert not torch.equal(a, evaluated)
    assert torch.equal(run(2, train=False), evaluated)
    # a frozen encoder runs in eval mode inside a training step: no block is dropped
    assert torch.equal(run(1, frozen=("backbone",)), evaluated)
    # drop_path=0: training and evaluation compute the same (Swin has no BatchNorm)
    model, params, buffers = _tiny("swin_t", 0.0)
    assert torch.equal(_c5(model, params, buffers, x, 1),
                       _c5(model, params, buffers, x, 1, train=False))


@pytest.mark.usefixtures("tiny_encoders")
@pytest.mark.parametrize("name", ["swin_t", "efficientnet_b0"])
def test_recomputed_blocks_draw_the_same_blocks(name):
    # Activation checkpointing runs each block again in the backward; torch.utils.checkpoint
    # restores the RNG state first, so the recomputation drops the blocks the forward dropped
    # and the gradients are those of the plain step (float32 summation order aside).
    model, params, buffers = _tiny(name, 0.5)
    head = nn.Conv2d(backbones.channels(name)["c5"], 3, 1)

    class Model(Holder):
        def forward(self, x):
            return {"out": nn.functional.interpolate(head(self.backbone(x)["c5"]), x.shape[-2:])}

    model = Model(model.backbone)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    results = []
    for checkpoint in (False, True):
        opt = optim.sgd(0.1)
        step = seg_train.make_train_step(model, losses.cross_entropy, opt, optim.constant(0.1),
                                         trainable=list(params), checkpoint_activations=checkpoint)
        torch.manual_seed(3)
        state, m = step(seg_train.init_state(params, buffers, opt, list(params)), (x, y))
        results.append((m["loss"], state.params))
    (loss, plain), (loss_ckpt, recomputed) = results
    assert torch.equal(loss, loss_ckpt)
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-5, atol=1e-7)
