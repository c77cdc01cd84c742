from __future__ import annotations

import math

import ml_collections
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from seg.models import PSPNet, UNet, build, param_count
from seg.models import backbones
from seg.models.pspnet import PyramidPooling

ODD_AND_EVEN = [(64, 64), (97, 131)]


def _convs(net: nn.Module) -> dict[str, tuple]:
    return {n: (m.stride, m.dilation, m.padding) for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d)}


# --- backbone ----------------------------------------------------------------------------------

def resnet(name, output_stride=8, layers=("layer3", "layer4")):
    """The encoder keyed by torchvision's layer names (c2 ... c5 are layer1 ... layer4)."""
    return backbones.encoder(name, {f"c{int(layer[-1]) + 1}": layer for layer in layers},
                             output_stride)


@pytest.mark.parametrize("name, output_stride, replace", [
    ("resnet50", 8, [False, True, True]), ("resnet50", 16, [False, False, True]),
    ("resnext50_32x4d", 8, [False, True, True])])
def test_bottleneck_dilation_matches_torchvision(name, output_stride, replace):
    torch.manual_seed(0)
    layers = {"layer3": "layer3", "layer4": "layer4"}
    ref = IntermediateLayerGetter(
        getattr(torchvision.models, name)(replace_stride_with_dilation=replace), layers).eval()
    ours = resnet(name, output_stride).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert _convs(ours) == _convs(ref)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert want["layer4"].shape[-1] == 32 // output_stride
    for k in layers:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_resnet18_dilation_by_hand():
    # (stride, dilation, padding) of every conv at output stride 8: the conv that used to
    # stride keeps the dilation before it; every conv after it gets the doubled dilation.
    plain, d2, d4 = ((1, 1), (1, 1), (1, 1)), ((1, 1), (2, 2), (2, 2)), ((1, 1), (4, 4), (4, 4))
    ds = ((1, 1), (1, 1), (0, 0))
    want = {"conv1": ((2, 2), (1, 1), (3, 3))}
    for b in "01":
        want |= {f"layer1.{b}.conv1": plain, f"layer1.{b}.conv2": plain}
    want |= {"layer2.0.conv1": ((2, 2), (1, 1), (1, 1)), "layer2.0.conv2": plain,
             "layer2.0.downsample.0": ((2, 2), (1, 1), (0, 0)),
             "layer2.1.conv1": plain, "layer2.1.conv2": plain}
    want |= {"layer3.0.conv1": plain, "layer3.0.conv2": d2, "layer3.0.downsample.0": ds,
             "layer3.1.conv1": d2, "layer3.1.conv2": d2}
    want |= {"layer4.0.conv1": d2, "layer4.0.conv2": d4, "layer4.0.downsample.0": ds,
             "layer4.1.conv1": d4, "layer4.1.conv2": d4}
    net = resnet("resnet18", 8)
    assert _convs(net) == want
    out = net(torch.randn(2, 3, 64, 64))
    assert out["layer3"].shape == (2, 256, 8, 8)
    assert out["layer4"].shape == (2, 512, 8, 8)


@pytest.mark.parametrize("output_stride", [16, 32])
def test_resnet18_other_strides(output_stride):
    out = resnet("resnet18", output_stride, ("layer4",))(torch.randn(1, 3, 64, 64))
    assert list(out) == ["layer4"]
    assert out["layer4"].shape == (1, backbones.channels("resnet18")["c5"], 64 // output_stride,
                                   64 // output_stride)


def test_pspnet_resnet50_backbone_loads_torchvision_state_dict_strictly():
    model = PSPNet(5, backbone="resnet50")
    tv = torchvision.models.resnet50().state_dict()
    model.backbone.load_state_dict({k: v for k, v in tv.items() if not k.startswith("fc.")},
                                   strict=True)
    sd = model.state_dict()
    torch.testing.assert_close(sd["backbone.layer1.0.conv1.weight"], tv["layer1.0.conv1.weight"])
    assert model.classifier[1].out_channels == 512  # 2048 // 4
    assert model.aux_classifier[0].out_channels == 256  # 1024 // 4


@pytest.mark.parametrize("name", ["resnext50_32x4d", "resnext101_32x8d"])
def test_resnext_loads_torchvision_state_dict_strictly(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().state_dict()
    ours = resnet(name, output_stride=8, layers=("layer1", "layer4"))
    ours.load_state_dict({k: v for k, v in tv.items() if not k.startswith("fc.")}, strict=True)
    conv = ours.layer1[0].conv2  # 32 groups of 4 (50_32x4d) or 8 (101_32x8d) channels
    assert (conv.groups, conv.in_channels // conv.groups) == (32, int(name[-2]))
    x = torch.randn(1, 3, 32, 32)
    out = ours.eval()(x)
    assert out["layer4"].shape == (1, backbones.channels(name)["c5"], 4, 4)
    assert out["layer1"].shape == (1, 256, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet9"), "name='resnet9'"), (dict(output_stride=4), "output_stride=4"),
    (dict(levels={"c6": "x"}), "c6"), (dict(levels={}), "levels")])
def test_resnet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        backbones.encoder(**{"name": "resnet18", "levels": {"c5": "c5"}, **kwargs})


# --- UNet ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", ODD_AND_EVEN)
def test_unet_output_at_input_size(bilinear, size):
    model = UNet(3, base_channels=8, bilinear=bilinear)
    out = model(torch.randn(2, 3, *size))
    assert list(out) == ["out"]
    assert out["out"].shape == (2, 3, *size)


def test_unet_param_count_by_hand():
    def double_conv(cin, cout, mid):  # two bias-free 3x3 convs, two BNs (weight + bias)
        return 9 * cin * mid + 2 * mid + 9 * mid * cout + 2 * cout

    def transposed(cin):  # ConvTranspose2d(cin, cin // 2, 2, stride 2) with bias
        return cin * (cin // 2) * 4 + cin // 2

    encoder = (double_conv(3, 64, 64) + double_conv(64, 128, 128) + double_conv(128, 256, 256)
               + double_conv(256, 512, 512) + double_conv(512, 1024, 1024))
    decoder = sum(transposed(c) + double_conv(c, c // 2, c // 2) for c in (1024, 512, 256, 128))
    head = 64 * 2 + 2
    assert encoder + decoder + head == 31_037_698
    model = UNet(2, base_channels=64, depth=4, bilinear=False)
    assert param_count(model) == encoder + decoder + head
    assert param_count(UNet(2, bilinear=True)) == pytest.approx(17.26e6, rel=0.01)


def test_unet_dropout_zero_disables():
    model = UNet(1, base_channels=4, depth=2, dropout=0.0).train()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x)["out"], model(x)["out"], rtol=0, atol=0)
    assert not any(isinstance(m, nn.Dropout2d) for m in model.modules())


# --- PSPNet ----------------------------------------------------------------------------------

@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("size", ODD_AND_EVEN)
def test_pspnet_outputs_at_input_size(aux, size):
    model = PSPNet(4, backbone="resnet18", aux=aux)
    out = model(torch.randn(2, 3, *size))
    assert set(out) == ({"out", "aux"} if aux else {"out"})
    for v in out.values():
        assert v.shape == (2, 4, *size)
    assert model.classifier[1].out_channels == 128  # 512 // 4


def test_pyramid_pooling_channels():
    ppm = PyramidPooling(10, bins=(1, 2, 3, 6))
    x = torch.randn(2, 10, 7, 9)
    y = ppm(x)
    assert y.shape == (2, 10 + 4 * (10 // 4), 7, 9)
    torch.testing.assert_close(y[:, :10], x, rtol=0, atol=0)  # the input appears once, first


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pyramid_pooling_global_branch_by_hand(pool, randomise_bn):
    torch.manual_seed(0)
    ppm = PyramidPooling(4, bins=(1,), pool=pool).eval()
    randomise_bn(ppm)
    x = torch.randn(2, 4, 5, 7)
    conv, bn = ppm.branches[0][1], ppm.branches[0][2]
    stat = x.mean(dim=(2, 3)) if pool == "avg" else x.amax(dim=(2, 3))
    z = stat @ conv.weight.view(4, 4).T
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    want = z.clamp(min=0)[:, :, None, None].expand(2, 4, 5, 7)
    with torch.no_grad():
        got = ppm(x)[:, 4:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_max_and_avg_pooling_differ(randomise_bn):
    torch.manual_seed(0)
    avg = PyramidPooling(8, pool="avg").eval()
    mx = PyramidPooling(8, pool="max").eval()
    randomise_bn(avg)
    mx.load_state_dict(avg.state_dict(), strict=True)
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(avg(x), mx(x))


@pytest.mark.parametrize("kwargs", [dict(pool="min"), dict(bins=(1, 0)), dict(bins=())])
def test_pyramid_pooling_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PyramidPooling(8, **kwargs)


# --- registry, training, statelessness --------------------------------------------------------

def test_build_reads_config_fields():
    cfg = ml_collections.ConfigDict(dict(name="unet", base_channels=8, depth=2, bilinear=True,
                                         dropout=0.0))
    unet = build(cfg, num_outputs=3)
    assert isinstance(unet, UNet) and len(unet.downs) == 2 and unet.inc[0].out_channels == 8
    assert isinstance(unet.ups[0].up, nn.Upsample) and unet.outc.out_channels == 3
    cfg = ml_collections.ConfigDict(dict(name="pspnet", backbone="resnet18", output_stride=16,
                                         bins=(1, 3), pool="max", dropout=0.2, aux=False))
    psp = build(cfg, num_outputs=2)
    assert isinstance(psp, PSPNet) and psp.aux_classifier is None
    ppm = psp.classifier[0]
    assert [b[0].output_size for b in ppm.branches] == [1, 3]
    assert isinstance(ppm.branches[0][0], nn.AdaptiveMaxPool2d)
    assert psp.classifier[4].p == 0.2
    assert psp.backbone.layer4[0].conv2.dilation == (2, 2)
    assert psp.backbone.layer3[0].conv1.stride == (2, 2)  # not dilated at stride 16
    with pytest.raises(ValueError, match="model.name='x'"):
        build(ml_collections.ConfigDict(dict(name="x")), num_outputs=2)
    # fields the config leaves out are the definition's defaults; a field it lacks is named
    assert build(ml_collections.ConfigDict(dict(name="unet", backbone_weights="")), 3
                 ).outc.in_channels == 64
    with pytest.raises(ValueError, match=r"model\.bin is not a field of model\.name='pspnet'"):
        build(ml_collections.ConfigDict(dict(name="pspnet", bin=(1,))), num_outputs=2)


_MODELS = {
    "unet": lambda: UNet(2, base_channels=8, depth=2, dropout=0.0),
    "unet_bilinear": lambda: UNet(2, base_channels=8, depth=3, bilinear=True),
    "pspnet": lambda: PSPNet(2, backbone="resnet18", dropout=0.0),
    "pspnet_noaux": lambda: PSPNet(2, backbone="resnet18", aux=False),
}


# PSPNet predicts at 1/8 resolution, so its target is constant on 8x8 blocks; the UNet's is per pixel.
@pytest.mark.parametrize("name, block, lr, steps", [("unet", 1, 0.3, 10), ("pspnet", 8, 0.1, 6)])
def test_sgd_steps_decrease_loss(name, block, lr, steps):
    torch.manual_seed(0)
    model = _MODELS[name]().train()
    x = torch.randn(2, 3, 32, 32)
    y = F.avg_pool2d(x[:, :1], block) > 0  # a rule on the input the model can fit
    y = y.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, 0].long()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        out = model(x)
        loss = sum(w * F.cross_entropy(out[k], y) for k, w in (("out", 1.0), ("aux", 0.4)) if k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    # Logits start near zero (init_logits_), so each head starts at CE = log(2).
    assert losses[0] == pytest.approx((1.4 if "aux" in out else 1.0) * math.log(2), rel=0.02)
    assert losses[-1] < 0.9 * losses[0]


# What a fresh instance of each torch base class carries: our modules may add nothing to it.
