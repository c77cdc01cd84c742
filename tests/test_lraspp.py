"""LR-ASPP (seg/models/lraspp.py) against torchvision's lraspp_mobilenet_v3_large: its
state_dict loads strictly, outputs and parameter count are torchvision's."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import segmentation

from seg.models import LRASPP, param_count
from seg.models.backbones import from_torchvision_segmentation


@pytest.fixture(scope="module")
def torchvision_and_ours(randomise_bn):
    torch.manual_seed(0)
    ref = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                 num_classes=5)
    randomise_bn(ref)
    ours = LRASPP(5, backbone="mobilenet_v3_large", output_stride=16)
    ours.load_state_dict(from_torchvision_segmentation(ref.state_dict(), "mobilenet_v3_large"),
                         strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("shape", [(1, 3, 97, 131), (2, 3, 64, 64)])
def test_equals_torchvision_lraspp_mobilenet_v3_large(torchvision_and_ours, shape):
    ref, ours = torchvision_and_ours
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert set(got) == set(want) == {"out"}
    assert got["out"].shape == (shape[0], 5, *shape[2:])
    # the same modules and functional ops in the same order: the same kernels, bitwise
    torch.testing.assert_close(got["out"], want["out"], rtol=0, atol=0)
    assert want["out"].std() > 0.05  # the comparison is not between two near-zero maps


def test_parameter_count_is_torchvisions_published_one():
    weights = segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    with torch.device("meta"):
        model = LRASPP(21)  # the defaults are torchvision's: MobileNetV3-Large at stride 16
    assert param_count(model) == weights.meta["num_params"] == 3_221_538


def test_the_head_reads_the_stride_8_block_and_the_last_layer():
    model = LRASPP(3).eval()
    head = model.classifier
    assert head.low_classifier.in_channels == 40    # features.4: the first stride-8 block
    assert head.cbr[0].in_channels == head.scale[1].in_channels == 960   # features.16
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {"low": (8, 8),
                                                                     "high": (4, 4)}
