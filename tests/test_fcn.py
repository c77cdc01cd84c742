from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from seg import functional, models
from seg.models.fcn import FCNResNet, FCNVGG, bilinear_kernel
from seg.models.vgg import STAGE_CHANNELS, STAGES, vgg

SIZES = [(97, 131), (128, 128), (64, 64)]


@functools.cache
def _fcn(variant: str) -> FCNVGG:
    """One FCN per variant for the read-only tests (eval mode; do not train these). VGG-11 and a
    narrow fc6/fc7 for speed: the skips and upsampling under test are the same on every VGG."""
    torch.manual_seed(0)
    return FCNVGG(21, variant, backbone="vgg11", fc_channels=64).eval()


def _pool_outputs(features: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's features run layer by layer, keeping what each max pool returns."""
    outs = []
    for layer in features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            outs.append(x)
    return outs


# --- VGG encoder ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg_loads_torchvision_state_dict_strictly_and_computes_the_same(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    ours = vgg(name, STAGES).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if k.startswith("features.")},
                         strict=True)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        got, want = ours(x), _pool_outputs(tv.features, x)
    assert list(got) == list(STAGES)
    for i, stage in enumerate(STAGES, start=1):
        # torchvision pools with floor: 97 x 131 loses its last row/column at every stage.
        assert got[stage].shape == (1, STAGE_CHANNELS[stage], 97 // 2**i, 131 // 2**i)
        torch.testing.assert_close(got[stage], want[i - 1], rtol=0, atol=0)


def test_vgg_ceil_mode_keeps_every_pixel_and_drops_layers_after_the_last_stage():
    net = vgg("vgg11", ("pool2", "pool3"), ceil_mode=True)
    out = net(torch.randn(1, 3, 97, 131))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "pool2": (1, 128, 25, 33), "pool3": (1, 256, 13, 17)}  # ceil(97 / 4), ceil(131 / 8), ...
    # vgg11 ("A"): conv 0, pool 2, conv 3, pool 5, conv 6, 8, pool 10: nothing after features.10.
    assert max(int(k.split(".")[1]) for k in net.state_dict()) == 8


@pytest.mark.parametrize("kwargs", [dict(name="vgg15"), dict(return_stages=("pool6",)),
                                    dict(return_stages=())])
def test_vgg_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        vgg(**kwargs)


# --- FCN on VGG --------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_upsampling_is_bilinear_interpolation_away_from_the_border(factor):
    ups = {2: _fcn("8s").upscore2, 8: _fcn("8s").upscore8, 16: _fcn("16s").upscore16,
           32: _fcn("32s").upscore32}
    up = ups[factor]
    assert up.bias is None and (up.stride, up.kernel_size) == ((factor,) * 2, (2 * factor,) * 2)
    x = torch.randn(2, 21, 5, 7)
    with torch.no_grad():
        got = up(x)
    want = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert got.shape == want.shape == (2, 21, 5 * factor, 7 * factor)
    # Only the outer factor / 2 pixels differ: there the transposed conv reads zeros beyond the
    # edge where interpolation repeats the edge.
    b = factor // 2
    torch.testing.assert_close(got[..., b:-b, b:-b], want[..., b:-b, b:-b], rtol=0, atol=1e-5)
    assert not torch.allclose(got[..., :b, :], want[..., :b, :], atol=1e-3)
    if factor == 2:
        assert torch.equal(_fcn("8s").upscore_pool4.weight, up.weight)


def test_bilinear_kernel_by_hand():
    w = bilinear_kernel(2, 2)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[0, 0], torch.outer(taps, taps), rtol=0, atol=0)
    assert torch.equal(w[1, 1], w[0, 0]) and not w[0, 1].any() and not w[1, 0].any()
    with pytest.raises(ValueError, match="factor=3"):
        bilinear_kernel(1, 3)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", ["8s", "16s", "32s"])
def test_output_has_input_size(variant, size):
    with torch.no_grad():
        out = _fcn(variant)(torch.randn(1, 3, *size))
    assert list(out) == ["out"] and out["out"].shape == (1, 21, *size)


@pytest.mark.parametrize("variant, factors", [("32s", (32,)), ("16s", (2, 16)), ("8s", (2, 2, 8))])
def test_at_init_skips_add_nothing_and_output_is_interpolated_score_fr(variant, factors):
    # What the zero-initialised score_pool4/3 give: each variant starts as bilinear upsampling of
    # score_fr. Not FCN-8s == FCN-32s: bilinear x2 then x16 is not bilinear x32 (wider kernel).
    model = _fcn(variant)
    for conv in (model.score_pool4, model.score_pool3):
        assert conv is None or (not conv.weight.any() and not conv.bias.any())
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        features = model.backbone(x)
        score = model.score_fr(F.relu(model.fc7(F.relu(model.fc6(features["pool5"])))))
        out = model(x)["out"]
    # Grid sizes after each upsampling: pool4, pool3 (ceil-mode pooling), then the input.
    sizes = [features[s].shape[-2:] for s in ("pool4", "pool3")[: len(factors) - 1]] + [(97, 131)]
    want = score
    for factor, size in zip(factors, sizes):
        want = F.interpolate(want, scale_factor=factor, mode="bilinear", align_corners=False)
        want = want[..., : size[0], : size[1]]
    m = 32  # wider than the border each composed transposed conv contaminates
    torch.testing.assert_close(out[..., m:-m, m:-m], want[..., m:-m, m:-m], rtol=0, atol=1e-4)
    if variant != "32s":
        x32 = F.interpolate(score, scale_factor=32, mode="bilinear", align_corners=False)
        assert not torch.allclose(out[..., m:-m, m:-m], x32[..., m:97 - m, m:131 - m], atol=1e-3)


def test_fcn8s_vgg16_parameter_count_by_hand():
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]  # VGG-16's convs
    vgg16 = sum(9 * cin * cout + cout for cin, cout in zip([3] + widths[:-1], widths))
    k = 21
    fc = (49 * 512 * 4096 + 4096) + (4096 * 4096 + 4096)  # fc6 (7x7), fc7 (1x1)
    scores = (4096 + 1) * k + (512 + 1) * k + (256 + 1) * k  # score_fr, score_pool4, score_pool3
    ups = k * k * (4 * 4 + 4 * 4 + 16 * 16)  # upscore2, upscore_pool4, upscore8: no bias
    assert vgg16 == 14_714_688  # torchvision's vgg16 without its classifier
    with torch.device("meta"):  # shapes only
        n = sum(p.numel() for p in FCNVGG(k, "8s", "vgg16").parameters())
    assert n == vgg16 + fc + scores + ups == 134_489_759
    assert abs(n - 134e6) / 134e6 < 0.005  # the paper's "134M"


def test_fcn_backbone_loads_torchvision_vgg_strictly():
    torch.manual_seed(0)
    tv = torchvision.models.vgg11().state_dict()
    model = FCNVGG(3, "32s", backbone="vgg11", fc_channels=8)
    model.backbone.load_state_dict({k: v for k, v in tv.items() if k.startswith("features.")},
                                   strict=True)
    assert torch.equal(model.state_dict()["backbone.features.18.weight"], tv["features.18.weight"])


def test_sgd_steps_decrease_loss_and_train_the_zero_initialised_skips():
    torch.manual_seed(0)
    model = FCNVGG(2, "8s", backbone="vgg11_bn", dropout=0.0, fc_channels=64).train()
    x = torch.randn(2, 3, 32, 32)
    y = F.avg_pool2d(x[:, :1], 8) > 0  # constant on 8x8 blocks: what stride-8 logits can fit
    y = y.repeat_interleave(8, 2).repeat_interleave(8, 3)[:, 0].long()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert losses[0] == pytest.approx(math.log(2), rel=0.02)  # score_fr starts near zero
    assert losses[-1] < 0.9 * losses[0]
    assert model.score_pool3.weight.abs().sum() > 0 and model.score_pool4.weight.abs().sum() > 0


def test_train_step_traces_as_one_graph():
    # backend="eager": dynamo's tracing (where graph breaks come from) without inductor's codegen.
    model, params, buffers = functional.init(
        lambda: FCNVGG(3, "8s", "vgg11_bn", fc_channels=64), seed=0)
    model.train()
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 3, (2, 40, 40))

    def loss_of(p, b):
        out, new_buffers = functional.apply(model, p, b, x)
        return F.cross_entropy(out["out"], y), new_buffers

    def step(p, b):
        return torch.func.grad_and_value(loss_of, has_aux=True)(p, b)

    torch.manual_seed(1)  # the same dropout masks in both calls
    want_grads, (want_loss, _) = step(params, buffers)
    torch.manual_seed(1)
    got_grads, (got_loss, _) = torch.compile(step, fullgraph=True, backend="eager")(params, buffers)
    assert torch.equal(got_loss, want_loss)
    for k in ("upscore8.weight", "score_pool3.weight", "backbone.features.0.weight"):
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_outputs=0), "num_outputs=0"), (dict(variant="4s"), "variant='4s'"),
    (dict(backbone="vgg15"), "name='vgg15'"), (dict(dropout=1.0), "dropout=1.0"),
    (dict(fc_channels=0), "fc_channels=0")])
def test_fcn_vgg_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FCNVGG(**{"num_outputs": 2, "fc_channels": 8, **kwargs})


# --- FCN on a dilated ResNet ------------------------------------------------------------------

def test_fcn_resnet50_equals_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=5)
    for m in tv.modules():  # non-trivial BatchNorm statistics, so eval mode tests them too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = FCNResNet(5, "resnet50", aux=True)
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.eval(), ours.eval()
    assert [type(m) for m in ours.classifier] == [type(m) for m in tv.classifier]
    assert [type(m) for m in ours.aux_classifier] == [type(m) for m in tv.aux_classifier]
    for shape in [(1, 3, 97, 131), (2, 3, 32, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got, want = ours(x), tv(x)
        assert list(got) == ["out", "aux"] and got["out"].shape == (shape[0], 5, *shape[2:])
        for k in ("out", "aux"):
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


def test_fcn_resnet_without_aux_and_bad_arguments():
    model = FCNResNet(3, "resnet18", output_stride=16, aux=False, dropout=0.2)
    assert model.aux_classifier is None and model.classifier[3].p == 0.2
    assert model.classifier[0].in_channels == 512 and model.classifier[0].out_channels == 128
    out = model.eval()(torch.randn(1, 3, 33, 47))
    assert list(out) == ["out"] and out["out"].shape == (1, 3, 33, 47)
    for kwargs, match in [(dict(num_outputs=0), "num_outputs=0"), (dict(dropout=-0.1), "dropout"),
                          (dict(backbone="resnet9"), "resnet9")]:
        with pytest.raises(ValueError, match=match):
            FCNResNet(**{"num_outputs": 2, "backbone": "resnet18", **kwargs})


# --- configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_configs_build_the_paper_network_and_freeze_its_final_upsampling(variant):
    cfg = importlib.import_module(f"configs.fcn{variant}").get_config()
    with torch.device("meta"):  # shapes only: 136M parameters need not be initialised
        model = models.build(cfg.model, cfg.data.num_classes)
    assert isinstance(model, FCNVGG) and model.fc7.out_channels == 4096
    assert model.backbone.get_submodule("features.28").out_channels == 512  # VGG-16's last conv
    assert cfg.train.freeze == (f"upscore{variant[:-1]}",)  # the paper keeps it bilinear
    assert isinstance(model.get_submodule(cfg.train.freeze[0]), nn.ConvTranspose2d)


def test_fcn_resnet50_config_builds_torchvision_layout():
    cfg = importlib.import_module("configs.fcn_resnet50").get_config()
    with torch.device("meta"):
        model = models.build(cfg.model, cfg.data.num_classes)
    assert isinstance(model, FCNResNet) and model.aux_classifier is not None
    assert model.classifier[0].in_channels == 2048 and cfg.loss.aux_weight == 0.5
