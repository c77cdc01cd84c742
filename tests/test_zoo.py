"""Every model config, shrunk to test size: modules hold structure only, logits have the input's
size for odd and even inputs, a few train steps through the real train step lower the loss,
and the step is captured by torch.compile as one graph with the same numbers as eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from configs import (backbone_unet, deeplabv3, deeplabv3plus, fcn8s, fcn16s, fcn32s, fcn_resnet50,
                     fpn, lraspp, pspnet, twostream, unet, upernet)
from seg import functional, losses, models, optim
from seg.data import batches, synthetic
from seg import train as seg_train

# config module -> model overrides that keep the architecture but make it test-sized
ZOO = {
    "fcn32s": (fcn32s, {"backbone": "vgg11", "fc_channels": 64}),
    "fcn16s": (fcn16s, {"backbone": "vgg11", "fc_channels": 64}),
    "fcn8s": (fcn8s, {"backbone": "vgg11", "fc_channels": 64}),
    "fcn_resnet50": (fcn_resnet50, {"backbone": "resnet18"}),
    "unet": (unet, {"base_channels": 8, "depth": 3}),
    "pspnet": (pspnet, {"backbone": "resnet18"}),
    "deeplabv3": (deeplabv3, {"backbone": "resnet18"}),
    "twostream": (twostream, {"backbone": "resnet18"}),
    # One encoder family each; mobilenet_v3_large, efficientnet_b0, convnext_tiny and swin_t
    # are test-sized here (conftest.TINY_NETS), the last three with stochastic depth on.
    "deeplabv3plus": (deeplabv3plus, {"backbone": "mobilenet_v3_large", "channels": 32}),
    "upernet": (upernet, {"backbone": "convnext_tiny", "channels": 32, "drop_path": 0.2}),
    "fpn": (fpn, {"backbone": "swin_t", "fpn_channels": 32, "channels": 16, "drop_path": 0.2}),
    "lraspp": (lraspp, {}),
    "backbone_unet": (backbone_unet, {"backbone": "efficientnet_b0", "drop_path": 0.2,
                                      "decoder_channels": (32, 16, 16, 8, 8)}),
}
pytestmark = pytest.mark.usefixtures("tiny_encoders")


def config(name):
    module, overrides = ZOO[name]
    cfg = module.get_config()
    for k, v in overrides.items():
        cfg.model[k] = v
    return cfg


def setup(name, compile=False):
    cfg = config(name)
    model, params, buffers = functional.init(lambda: models.build(cfg.model, 3), seed=0)
    optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, 100)
    trainable, _ = functional.split_trainable(params, cfg.train.freeze)
    step = seg_train.make_train_step(model, losses.build(cfg.loss, 3), optimizer, schedule,
                                     trainable=trainable, frozen_modules=cfg.train.freeze,
                                     aux_weight=cfg.loss.aux_weight, compile=compile)
    return model, params, buffers, step, seg_train.init_state(params, buffers, optimizer,
                                                              trainable)


def batch(size=(64, 64), b=2):
    """Real samples of the embedded dataset: a learnable batch, unlike random labels."""
    data = synthetic.generate("train", b, image_size=size)
    return batches.normalize(data.images, data.mean, data.std), data.masks.long()


# torch classes that ours derive from, with a way to make a plain instance to compare against
BASES = {nn.Conv2d: lambda: nn.Conv2d(1, 1, 1), nn.Sequential: nn.Sequential, nn.Module: nn.Module}


@pytest.mark.parametrize("name", ZOO)
def test_modules_hold_only_structure(name):
    model = models.build(config(name).model, 3).train()
    model(batch((32, 32))[0])  # a forward must not leave anything behind
    for path, m in model.named_modules():
        leftovers = {k for k, v in vars(m).items()
                     if isinstance(v, (torch.Tensor, nn.Module, torch.optim.Optimizer))}
        assert not leftovers, f"{type(m).__name__} {path}: {leftovers}"
        if type(m).__module__.startswith("seg."):  # our classes add no attributes of their own
            base = next(c for c in type(m).__mro__ if c in BASES)
            assert set(vars(m)) == set(vars(BASES[base]())), f"{type(m).__name__} {path}"


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("size", [(97, 131), (128, 128)])
def test_logits_have_the_input_size(name, size):
    model, params, buffers, _, _ = setup(name)
    functional.set_mode(model, train=False)
    out, _ = functional.apply(model, params, buffers, batch(size, b=1)[0])
    for key, logits in out.items():
        assert logits.shape == (1, 3, *size), (key, logits.shape)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_train_steps_lower_the_loss(name):
    _, _, _, step, state = setup(name)
    torch.manual_seed(0)
    data = batch()
    history = []
    for _ in range(5):
        state, m = step(state, data)
        history.append(float(m["loss"]))
    assert history[-1] < history[0], history


@pytest.mark.parametrize("name", ZOO)
def test_train_step_compiles_to_one_graph(name):
    torch._dynamo.reset()
    data = batch()
    results = []
    for compile in (False, "aot_eager"):  # fullgraph=True: a graph break would raise
        _, _, _, step, state = setup(name, compile=compile)
        torch.manual_seed(0)
        state, m = step(state, data)
        results.append((m["loss"], state.params))
    (eager_loss, eager_params), (compiled_loss, compiled_params) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    # atol 5e-5: Adam's first step, lr * m / sqrt(v), turns a gradient near eps into an update
    # of up to lr, so the ~1e-9 reordering noise of the compiled backward can show as 3e-5.
    for k in eager_params:
        torch.testing.assert_close(compiled_params[k], eager_params[k], rtol=1e-4, atol=5e-5)
