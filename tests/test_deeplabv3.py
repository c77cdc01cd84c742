from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from seg import functional
from seg.models import param_count
from seg.models.backbones import from_torchvision_segmentation
from seg.models.deeplabv3 import ASPP, DeepLabV3, ImagePooling


@pytest.fixture(scope="module")
def torchvision_and_ours(randomise_bn):
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=5)
    randomise_bn(ref)
    ours = DeepLabV3(5, backbone="resnet50", output_stride=8, aux=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("shape", [(1, 3, 97, 131), (2, 3, 64, 64)])
def test_equals_torchvision_deeplabv3_resnet50(torchvision_and_ours, shape):
    ref, ours = torchvision_and_ours
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert set(got) == set(want) == {"out", "aux"}
    for k in want:
        assert got[k].shape == (shape[0], 5, *shape[2:])
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    assert want["out"].std() > 0.1  # the comparison is not between two near-zero maps


def test_equals_torchvision_deeplabv3_mobilenet_v3_large(randomise_bn):
    # torchvision's MobileNetV3 model: output stride 16, rates 12-24-36, aux head on the
    # stride-8 block (features.4, 40 channels); its keys renamed to the classifier's names.
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=21)
    randomise_bn(ref)
    ours = DeepLabV3(21, backbone="mobilenet_v3_large", output_stride=16, rates=(12, 24, 36))
    ours.load_state_dict(from_torchvision_segmentation(ref.state_dict(), "mobilenet_v3_large"),
                         strict=True)
    weights = torchvision.models.segmentation.DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT
    assert param_count(ours) == weights.meta["num_params"] == 11_029_328
    assert ours.aux_classifier[0].in_channels == 40
    x = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref.eval()(x), ours.eval()(x)
    assert set(got) == set(want) == {"out", "aux"}
    torch.testing.assert_close(got["aux"], want["aux"], rtol=0, atol=0)  # same kernels
    # ASPP's image pooling: ours broadcasts the pooled 1x1 map where torchvision interpolates
    # it bilinearly (v * (1 - w) + v * w rounds in float32); 1e-5 covers that rounding carried
    # through the projection and the 3x3 conv, as for deeplabv3_resnet50 above.
    torch.testing.assert_close(got["out"], want["out"], rtol=0, atol=1e-5)
    assert want["out"].std() > 0.1


def _dilations(model: DeepLabV3) -> list[tuple]:
    aspp = model.classifier[0]
    return [(b[0].kernel_size, b[0].dilation, b[0].padding) for b in aspp.convs[:-1]]


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_rates_follow_the_paper(output_stride, rates):
    model = DeepLabV3(3, backbone="resnet18", output_stride=output_stride, aux=False)
    one_by_one = ((1, 1), (1, 1), (0, 0))
    assert _dilations(model) == [one_by_one] + [((3, 3), (r, r), (r, r)) for r in rates]
    paper = DeepLabV3(3, backbone="resnet18", output_stride=output_stride, aux=False, rates=())
    assert _dilations(paper) == _dilations(model)  # empty (the config's default): the paper's
    custom = DeepLabV3(3, backbone="resnet18", output_stride=output_stride, rates=(2, 5))
    assert _dilations(custom)[1:] == [((3, 3), (2, 2), (2, 2)), ((3, 3), (5, 5), (5, 5))]
    assert custom.classifier[0].project[0].in_channels == 4 * 256  # 1x1 + 2 rates + pooling


def test_image_pooling_is_global_by_hand(randomise_bn):
    torch.manual_seed(0)
    aspp = ASPP(4, rates=(1,), out_channels=3).eval()
    randomise_bn(aspp)
    pooling = aspp.convs[-1]
    assert isinstance(pooling, ImagePooling)
    x = torch.randn(2, 4, 5, 7)
    x[:, :, 0, 0] += 10.0  # one far-away pixel moves every output pixel: the pooling is global
    conv, bn = pooling[1], pooling[2]
    z = x.mean(dim=(2, 3)) @ conv.weight.view(3, 4).T
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    want = z.clamp(min=0)[:, :, None, None].expand(2, 3, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(pooling(x), want, rtol=1e-5, atol=1e-6)
        # and it is the last of the concatenated branches that the projection reads
        branches = torch.cat([b(x) for b in aspp.convs], dim=1)
        torch.testing.assert_close(branches[:, -3:], want, rtol=1e-5, atol=1e-6)


def test_image_pooling_needs_two_images_in_training():
    # torchvision's ASPPPooling has the same BN over a 1x1 map; we keep it (see ImagePooling).
    pooling = ImagePooling(4, 3).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        pooling(torch.randn(1, 4, 5, 5))
    assert pooling(torch.randn(2, 4, 5, 5)).shape == (2, 3, 5, 5)


@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_outputs_at_input_size(aux, size):
    model = DeepLabV3(4, backbone="resnet18", aux=aux).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert set(out) == ({"out", "aux"} if aux else {"out"})
    for v in out.values():
        assert v.shape == (1, 4, *size)
    # heads sized from backbones.channels: ResNet-18's layer4 / layer3 have 512 / 256 channels
    assert model.classifier[0].convs[0][0].in_channels == 512
    if aux:
        assert model.aux_classifier[0].out_channels == 64


def test_sgd_steps_decrease_loss():
    torch.manual_seed(0)
    model = DeepLabV3(2, backbone="resnet18").train()
    x = torch.randn(2, 3, 32, 32)
    # A rule on the input, constant on the 8x8 blocks that the stride-8 features see.
    y = (F.avg_pool2d(x[:, :1], 8) > 0).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, 0].long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        out = model(x)
        loss = F.cross_entropy(out["out"], y) + 0.5 * F.cross_entropy(out["aux"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    # Logits start near zero (init_logits_), so each head starts at CE = log(2).
    assert losses[0] == pytest.approx(1.5 * math.log(2), rel=0.02)
    assert losses[-1] < 0.9 * losses[0]


def test_train_step_traces_as_one_graph():
    # backend="eager": dynamo's tracing (where graph breaks come from) without inductor's minutes
    # of codegen. Same seed for both calls, so dropout draws the same masks.
    model, params, buffers = functional.init(lambda: DeepLabV3(3, backbone="resnet18"), seed=0)
    model.train()
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 3, (2, 40, 40))

    def loss_of(p, b):
        out, new_buffers = functional.apply(model, p, b, x)
        return F.cross_entropy(out["out"], y) + 0.5 * F.cross_entropy(out["aux"], y), new_buffers

    def step(p, b):
        return torch.func.grad_and_value(loss_of, has_aux=True)(p, b)

    torch.manual_seed(1)
    want_grads, (want_loss, want_buffers) = step(params, buffers)
    torch.manual_seed(1)
    got_grads, (got_loss, got_buffers) = torch.compile(step, fullgraph=True, backend="eager")(
        params, buffers)
    assert torch.equal(got_loss, want_loss)
    for k in params:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=0, atol=0)
    for k in buffers:
        torch.testing.assert_close(got_buffers[k], want_buffers[k], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_outputs=0), "num_outputs=0"), (dict(backbone="vgg16"), "name='vgg16'"),
    (dict(output_stride=4), "output_stride=4"),
    (dict(rates=(6, 0)), "rates"), (dict(rates=(6.0,)), "rates")])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepLabV3(**{"num_outputs": 2, "backbone": "resnet18", **kwargs})
