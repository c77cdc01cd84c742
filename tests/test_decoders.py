"""The heads on torchvision encoders (DeepLabV3+, UPerNet, Semantic FPN, UNet's decoder): their
layout as the papers give it, the FPN's top-down pathway by hand, and parameter counts against
the published ones."""
from __future__ import annotations

import ml_collections
import pytest
import torch
import torch.nn as nn

from seg.models import (BackboneUNet, DeepLabV3Plus, SemanticFPN, UPerNet, build, param_count)
from seg.models.fpn import FPN


def count(num_outputs=150, **fields) -> int:
    """Parameters of a model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return param_count(build(ml_collections.ConfigDict(fields), num_outputs))


# --- published parameter counts (ADE20K: 150 classes) ------------------------------------------

@pytest.mark.parametrize("backbone, millions", [
    # Liu et al. 2021 (Swin), Table 3; Liu et al. 2022 (ConvNeXt), Table 4: UperNet with
    # mmsegmentation's auxiliary head, params rounded to millions
    ("swin_t", 60), ("swin_s", 81), ("swin_b", 121),
    ("convnext_tiny", 60), ("convnext_small", 82), ("convnext_base", 122)])
def test_upernet_parameter_counts_are_the_papers(backbone, millions):
    assert round(count(name="upernet", backbone=backbone) / 1e6) == millions


@pytest.mark.parametrize("backbone, millions", [
    # Semantic FPN on ADE20K (mmsegmentation's), as tabulated by Wang et al. 2021 (PVT), to 0.1M
    ("resnet50", 28.5), ("resnet101", 47.5), ("resnext101_64x4d", 86.4)])
def test_semantic_fpn_parameter_counts_are_the_published_ones(backbone, millions):
    assert round(count(name="fpn", backbone=backbone) / 1e5) == round(millions * 10)


def test_deeplabv3plus_count_is_mmsegmentations_up_to_its_two_differences():
    # mmsegmentation's DeepLabV3+ R101-D8 (512 channels, auxiliary head): 62.7M (Xie et al. 2021,
    # SegFormer, Table 2). It projects the ASPP concatenation with a 3x3 conv where the paper
    # and ours use 1x1 (8 more taps of 5 x 512 -> 512), and its ResNetV1c replaces the 7x7 stem
    # conv by three 3x3 convs 3-32-32-64 with their BatchNorms (19,232 more parameters).
    ours = count(name="deeplabv3plus", backbone="resnet101", output_stride=8, channels=512,
                 aux=True)
    projection = 8 * (5 * 512) * 512
    stem = (27 * 32 + 9 * 32 * 32 + 9 * 32 * 64 + 2 * (32 + 32 + 64)) - (49 * 3 * 64 + 2 * 64)
    assert stem == 19_232
    assert round((ours + projection + stem) / 1e5) == 627


# --- layout ------------------------------------------------------------------------------------

def test_deeplabv3plus_layout_is_the_papers():
    model = DeepLabV3Plus(3, backbone="resnet18", output_stride=16)
    head = model.classifier
    assert head.low_level[0].in_channels == 64 and head.low_level[0].out_channels == 48
    # ASPP at output stride 16: 1x1, rates 6-12-18 as separable convs, image pooling
    branches = head.aspp.convs
    assert [b[0].dilation for b in branches[1:-1]] == [(6, 6), (12, 12), (18, 18)]
    assert all(b[0].groups == 512 for b in branches[1:-1])   # depthwise
    # decoder: two separable 3x3 convs of 256 on the 256 + 48 concatenated channels
    depthwise = [m for m in head.decoder if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [(m.in_channels, m.kernel_size) for m in depthwise] == [(304, (3, 3)), (256, (3, 3))]
    assert model.backbone.layer4[0].conv2.stride == (1, 1)   # output stride 16
    features = model.backbone(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in features.items()} == {"c2": 16, "c5": 4}
    plain = DeepLabV3Plus(3, backbone="resnet18", separable=False, output_stride=8)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in plain.modules())
    assert [b[0].dilation for b in plain.classifier.aspp.convs[1:-1]] == [(12, 12), (24, 24),
                                                                         (36, 36)]


def test_upernet_layout_is_mmsegmentations():
    model = UPerNet(3, backbone="resnet18", channels=64)
    head = model.classifier
    # pyramid pooling: every branch has the head's width, concatenated with c5
    assert [b[1].out_channels for b in head.ppm.branches] == [64] * 4
    assert head.bottleneck[0].in_channels == 512 + 4 * 64
    assert [lat[0].in_channels for lat in head.lateral] == [64, 128, 256]
    assert head.fuse[0].in_channels == 4 * 64
    assert model.aux_classifier[0].in_channels == 256        # c4
    assert model.aux_classifier[0].out_channels == 256       # mmsegmentation's width
    assert UPerNet(3, backbone="resnet18", aux=False).aux_classifier is None


def test_fpn_top_down_pathway_by_hand():
    # Identity laterals and identity 3x3 output convs: P_k = c_k + nearest-upsampled P_(k+1).
    fpn = FPN([4, 4, 4], channels=4)
    with torch.no_grad():
        for conv in (*fpn.lateral, *fpn.output):
            conv.weight.zero_()
            conv.bias.zero_()
            centre = conv.kernel_size[0] // 2
            conv.weight[range(4), range(4), centre, centre] = 1.0
    c = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    up = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    p4 = c[2]
    p3 = c[1] + up(p4)
    p2 = c[0] + up(p3)
    with torch.no_grad():
        got = fpn(c)
    for g, want in zip(got, (p2, p3, p4)):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-6)  # one or two float32 additions


def test_semantic_fpn_head_upsamples_each_level_to_stride_4():
    # Kirillov et al.: P_k gets max(1, k - 2) conv stages, each followed by x2 upsampling for
    # k > 2, so that every level arrives at stride 4 with 128 channels.
    model = SemanticFPN(3, backbone="resnet18")
    stages = [[type(m) for m in head] for head in model.classifier.scale_heads]
    convs = [s.count(nn.Conv2d) for s in stages]
    ups = [s.count(nn.Upsample) for s in stages]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]
    assert all(h[0].out_channels == 128 for h in model.classifier.scale_heads)
    assert [c.out_channels for c in model.classifier.fpn.lateral] == [256] * 4


@pytest.mark.parametrize("backbone, skips", [
    ("resnet18", [256, 128, 64, 64, 0]),       # layer3, layer2, layer1, the stem's ReLU
    ("convnext_tiny", [384, 192, 96, 0, 0])])  # no stride-2 level: the last two have no skip
def test_unet_decoder_joins_every_level_of_the_encoder(backbone, skips):
    with torch.device("meta"):
        model = BackboneUNet(3, backbone=backbone, decoder_channels=(64, 32, 16, 8, 8))
    ups = model.classifier.ups
    # transposed convs halve the upsampled channels; the double conv reads them with the skip
    ins = [up.up.out_channels + skip for up, skip in zip(ups, skips)]
    assert [up.conv[0].in_channels for up in ups] == ins
    assert [up.conv[3].out_channels for up in ups] == [64, 32, 16, 8, 8]


def test_unet_decoder_output_and_skip_alignment_at_odd_sizes():
    model = BackboneUNet(2, backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8),
                         bilinear=True).eval()
    sizes = []
    for up in model.classifier.ups:
        up.register_forward_hook(lambda m, i, out: sizes.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 49))["out"]
    assert out.shape == (1, 2, 65, 49)
    # ResNet's stride-2 convs round odd sizes up (65 -> 33 -> 17 -> 9 -> 5 -> 3): each x2 map
    # is padded or cropped to its skip; the last block, without one, doubles c1's size
    assert sizes == [(5, 4), (9, 7), (17, 13), (33, 25), (66, 50)]


@pytest.mark.parametrize("fields, match", [
    (dict(name="backbone_unet", decoder_channels=(8, 8)), "decoder_channels"),
    (dict(name="upernet", backbone="convnext_tiny", output_stride=16), "output_stride=16"),
    (dict(name="fpn", backbone="swin_t", drop_path=1.5), "drop_path"),
    (dict(name="lraspp", backbone="vit_b_16"), "vit_b_16")])
def test_bad_fields_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        count(3, **fields)
