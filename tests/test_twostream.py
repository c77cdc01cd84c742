from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from configs import twostream
from seg import functional, losses, optim
from seg import train as seg_train
from seg.models.twostream import TwoStreamPSPNet
from seg.models.weights import apply_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TwoStreamPSPNet(3).eval()


# Strides by hand: conv1 (k7 s2 p3), maxpool (k3 s2 p1) and each later stage (s2) map n to
# floor((n - 1) / 2) + 1. 97 -> 49 -> 25 -> 13 (layer2) -> 7 -> 4 (layer4); 131 -> ... 17 -> 5.
@pytest.mark.parametrize("shape, main, supp", [((2, 3, 64, 64), (8, 8), (2, 2)),
                                               ((1, 3, 97, 131), (13, 17), (4, 5))])
def test_streams_at_stride_8_and_32_and_logits_at_input_size(model, shape, main, supp):
    seen = {}
    hook = model.backbone.register_forward_hook(lambda m, args, out: seen.update(out))
    try:
        with torch.no_grad():
            out = model(torch.randn(*shape))
    finally:
        hook.remove()
    assert seen["layer2"].shape == (shape[0], 512, *main)
    assert seen["layer4"].shape == (shape[0], 2048, *supp)
    assert list(out) == ["out"] and out["out"].shape == (shape[0], 3, *shape[2:])


def test_torchvision_resnext_loads_strictly_and_gives_its_features(model):
    torch.manual_seed(1)
    tv = torchvision.models.resnext50_32x4d().eval()
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    _, params, buffers = functional.init(lambda: TwoStreamPSPNet(3), seed=0)
    encoder = {k[len("backbone."):]: v.shape for k, v in {**params, **buffers}.items()
               if k.startswith("backbone.")}
    assert encoder == {k: v.shape for k, v in sd.items()}  # what load_state_dict(strict) checks
    params, buffers = apply_backbone(params, buffers, sd)
    sub = lambda tree: {k[len("backbone."):]: v for k, v in tree.items()  # noqa: E731
                        if k.startswith("backbone.")}
    ref = IntermediateLayerGetter(tv, {"layer2": "layer2", "layer4": "layer4"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = torch.func.functional_call(model.backbone, (sub(params), sub(buffers)), (x,))
        want = ref(x)
    for k in ("layer2", "layer4"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_pyramid_pooling_sees_main_once(model):
    seen = {}
    hook = model.ppm.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
    finally:
        hook.remove()
    assert seen["x"].shape == (2, 512, 8, 8)
    assert seen["y"].shape == (2, 512 + 4 * 128, 8, 8)
    torch.testing.assert_close(seen["y"][:, :512], seen["x"], rtol=0, atol=0)
    assert not torch.equal(seen["y"][:, 512:1024], seen["x"])  # not the input a second time
    assert model.upsample[0][0].in_channels == 1024 + 512  # + the supplementary module's 512
    assert [s[0].out_channels for s in model.upsample] == [384, 192, 128]
    assert model.head.in_channels == 128


def _setup(cfg):
    # ResNet-18 keeps the train steps cheap on CPU; freezing does not depend on the encoder.
    cfg.model.backbone = "resnet18"
    model, params, buffers = functional.init(
        lambda: TwoStreamPSPNet(cfg.data.num_classes, cfg.model.backbone, cfg.model.bins,
                                cfg.model.dropout), seed=cfg.seed)
    trainable, frozen = functional.split_trainable(params, cfg.train.freeze)
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, cfg.train.steps)
    loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
    step = seg_train.make_train_step(model, loss_fn, optimizer, schedule, trainable=trainable,
                                     frozen_modules=cfg.train.freeze)
    return step, seg_train.init_state(params, buffers, optimizer, trainable), frozen


def _batch():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    # A rule the decoder can fit from the input, constant on the 8x8 cells of the main stream.
    cells = F.avg_pool2d(x[:, :1], 8)[:, 0]
    y = (cells > 0).long() + (cells > 0.3).long()
    y = y.repeat_interleave(8, 1).repeat_interleave(8, 2)
    y[:, :2] = 255
    return x, y


def test_config_freezes_encoder_weights_and_statistics():
    cfg = twostream.get_config()
    assert cfg.train.freeze == ("backbone",) and cfg.loss.ignore_index == 255
    step, state, frozen = _setup(cfg)
    assert frozen and all(k.startswith("backbone.") for k in frozen)
    start = state
    batch = _batch()
    for _ in range(2):
        state, _ = step(state, batch)
    for tree in ("params", "buffers"):
        old, new = getattr(start, tree), getattr(state, tree)
        for k, v in old.items():
            assert torch.equal(new[k], v) == k.startswith("backbone."), f"{tree} {k}"


def test_steps_decrease_loss():
    cfg = twostream.get_config()
    step, state, _ = _setup(cfg)
    batch, found = _batch(), []
    for _ in range(10):
        state, m = step(state, batch)
        found.append(m["loss"])
    # Logits start near zero (init_logits_): the first loss is log(3).
    assert found[0] == pytest.approx(math.log(3), rel=0.02)
    assert found[-1] < 0.9 * found[0]
