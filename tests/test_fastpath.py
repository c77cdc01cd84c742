"""The fast path (bf16 autocast, channels_last, torch.compile, activation checkpointing) against
the eager float32 step: each gives its numbers within its own tolerance."""
from __future__ import annotations

import ml_collections
import pytest
import torch

from seg import functional, losses, models, optim
from seg import train as seg_train


def unet_cfg():
    return ml_collections.ConfigDict(dict(name="unet", base_channels=4, depth=2, bilinear=False,
                                          dropout=0.5))


def pspnet_cfg():
    return ml_collections.ConfigDict(dict(name="pspnet", backbone="resnet18", output_stride=8,
                                          bins=(1, 2, 3, 6), pool="avg", dropout=0.1, aux=True))


def batches(n, b=2, size=(32, 32), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        masks = torch.randint(0, k, (b, *size), generator=g)
        masks[:, :2] = 255
        out.append((torch.randn(b, 3, *size, generator=g), masks))
    return out


def run(model_cfg, steps=2, *, channels_last=False, make_opt=None, **step_kw):
    """(initial params, final state, losses) of `steps` train steps."""
    model, params, buffers = functional.init(lambda: models.build(model_cfg, 3), seed=0)
    optimizer = (make_opt or (lambda: optim.sgd(0.05, momentum=0.9, weight_decay=1e-4)))()
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer, optim.constant(0.05),
                                     trainable=list(params), aux_weight=0.4,
                                     channels_last=channels_last, **step_kw)
    state = seg_train.init_state(params, buffers, optimizer, list(params),
                                 channels_last=channels_last)
    torch.manual_seed(123)  # dropout
    history = []
    for batch in batches(steps):
        state, m = step(state, batch)
        history.append(m["loss"])
    return params, state, torch.stack(history)


def update_error(p0, ref, other) -> float:
    """|| (other - p0) - (ref - p0) || / || ref - p0 || over all params: how far the training
    update moved away from the reference's, relative to the update itself."""
    num = sum(((other.params[k] - ref.params[k]) ** 2).sum() for k in p0)
    den = sum(((ref.params[k] - p0[k]) ** 2).sum() for k in p0)
    return float((num / den).sqrt())


def leaves(state):
    return torch.utils._pytree.tree_leaves((state.params, state.buffers, state.opt_state))


def test_bf16_autocast_keeps_fp32_state_and_loss_within_bf16_tolerance():
    p0, ref, ref_loss = run(unet_cfg())
    _, bf16, bf16_loss = run(unet_cfg(), precision="bf16")
    assert bf16_loss.dtype == torch.float32
    torch.testing.assert_close(bf16_loss, ref_loss, rtol=1e-2, atol=0)
    assert not torch.equal(bf16_loss, ref_loss), "autocast changed nothing: was it applied?"
    assert update_error(p0, ref, bf16) < 0.15  # measured 0.04; bf16 rounds at 2**-8
    for x in leaves(bf16):
        assert x.dtype in (torch.float32, torch.int64), x.dtype


def test_channels_last_matches_fp32_and_keeps_the_layout():
    p0, ref, ref_loss = run(unet_cfg())
    _, cl, cl_loss = run(unet_cfg(), channels_last=True)
    torch.testing.assert_close(cl_loss, ref_loss, rtol=1e-5, atol=0)
    assert update_error(p0, ref, cl) < 1e-4  # measured 6e-6: other conv kernels, same math
    for k, v in cl.params.items():
        assert v.dim() != 4 or v.is_contiguous(memory_format=torch.channels_last), k
    momentum = cl.opt_state["momentum"]
    assert all(v.dim() != 4 or v.is_contiguous(memory_format=torch.channels_last)
               for v in momentum.values())


def lraspp_cfg():
    return ml_collections.ConfigDict(dict(name="lraspp", backbone="mobilenet_v3_large",
                                          output_stride=16, inter_channels=16))


def upernet_convnext_cfg():
    return ml_collections.ConfigDict(dict(name="upernet", backbone="convnext_tiny", channels=16,
                                          drop_path=0.3))


@pytest.mark.usefixtures("tiny_encoders")  # test-sized MobileNetV3 and ConvNeXt
@pytest.mark.parametrize("model_cfg", [lraspp_cfg, upernet_convnext_cfg],
                         ids=["lraspp", "upernet_convnext"])
def test_torchvision_encoders_on_the_fast_path(model_cfg):
    # Squeeze-excitation, hardswish, LayerNorm2d and stochastic depth (the same draws: the
    # RNG is seeded before the steps) under bf16 autocast and channels_last, with the
    # tolerances of the UNet tests above. No bound on the bf16 update here: a conv followed by
    # LayerNorm (ConvNeXt's stem and downsamplings) is scale-invariant, so its gradient is what
    # LayerNorm's backward leaves after removing the mean and the normalised input's direction,
    # a difference that bf16's 2**-8 rounding of the conv output can dominate at init.
    p0, ref, ref_loss = run(model_cfg())
    _, bf16, bf16_loss = run(model_cfg(), precision="bf16")
    _, cl, cl_loss = run(model_cfg(), channels_last=True)
    torch.testing.assert_close(bf16_loss, ref_loss, rtol=1e-2, atol=0)
    assert not torch.equal(bf16_loss, ref_loss)
    assert all(x.dtype in (torch.float32, torch.int64) for x in leaves(bf16))
    torch.testing.assert_close(cl_loss, ref_loss, rtol=1e-5, atol=0)
    assert update_error(p0, ref, cl) < 1e-4


@pytest.mark.parametrize("model_cfg", [unet_cfg, pspnet_cfg], ids=["unet", "pspnet"])
def test_activation_checkpointing_gives_bitwise_the_same_step(model_cfg):
    # Dropout (UNet 0.5, PSPNet 0.1) and BatchNorm statistics included: the recomputation
    # restores the RNG and its second BatchNorm update must not reach the state.
    _, ref, ref_loss = run(model_cfg())
    _, ck, ck_loss = run(model_cfg(), checkpoint_activations=True)
    assert torch.equal(ck_loss, ref_loss)
    for k in ref.params:
        assert torch.equal(ck.params[k], ref.params[k]), k
    for k in ref.buffers:
        assert torch.equal(ck.buffers[k], ref.buffers[k]), k


def saved_activation_bytes(model_cfg, checkpoint_activations):
    """Bytes of the distinct non-parameter storages autograd saves for the backward."""
    model, params, buffers = functional.init(lambda: models.build(model_cfg, 3), seed=0)
    optimizer = optim.sgd(0.05)
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer, optim.constant(0.05),
                                     trainable=list(params),
                                     checkpoint_activations=checkpoint_activations)
    state = seg_train.init_state(params, buffers, optimizer, list(params))
    param_storages = {p.untyped_storage().data_ptr() for p in params.values()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            saved[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(state, batches(1, size=(64, 64))[0])
    return sum(saved.values())


def test_activation_checkpointing_saves_less_for_the_backward():
    plain = saved_activation_bytes(unet_cfg(), False)
    recomputed = saved_activation_bytes(unet_cfg(), True)
    assert recomputed < 0.5 * plain, (recomputed, plain)


def test_activation_checkpointing_refuses_what_it_cannot_do():
    fcn = ml_collections.ConfigDict(dict(name="fcn", variant="32s", backbone="vgg11",
                                         fc_channels=8))
    with pytest.raises(ValueError, match="checkpoint_activations.*no block"):
        run(fcn, 1, checkpoint_activations=True)
    with pytest.raises(ValueError, match="checkpoint_activations.*autograd"):
        run(unet_cfg(), 1, checkpoint_activations=True, grad_impl="func")


def test_unknown_precision_names_the_field():
    model = models.build(unet_cfg(), 3)
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        seg_train.make_eval_step(model, losses.cross_entropy, 3, precision="fp8")


def test_compiled_fast_path_matches_eager_fast_path():
    # aot_eager traces the whole step (autocast and memory format included) as one graph
    # (fullgraph=True: a break is an error) and runs it with eager kernels.
    kw = dict(precision="bf16", channels_last=True, grad_impl="func",
              make_opt=lambda: optim.adamw(optim.poly(1e-2, 2)))
    p0, eager, eager_loss = run(unet_cfg(), **kw)
    torch._dynamo.reset()
    _, compiled, compiled_loss = run(unet_cfg(), compile="aot_eager", **kw)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=0)
    assert update_error(p0, eager, compiled) < 0.05
    assert all(x.dtype in (torch.float32, torch.int64) for x in leaves(compiled))


def test_eval_metrics_with_the_fast_path(randomise_bn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = models.build(pspnet_cfg(), 3)
        randomise_bn(module)
    model, params, buffers = functional.init(lambda: module, seed=0)
    data = batches(2, b=2, size=(48, 48))

    def evaluate(**kw):
        step = seg_train.make_eval_step(model, losses.cross_entropy, 3, **kw)
        p = functional.to_channels_last(params) if kw.get("channels_last") else params
        return seg_train.evaluate(step, p, buffers, data)

    ref, cl, bf16 = evaluate(), evaluate(channels_last=True), evaluate(precision="bf16")
    assert cl["confusion_matrix"] == ref["confusion_matrix"]
    assert cl["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # bf16 logits may flip near-tied pixels: at most 1% of them, loss within bf16 rounding.
    moved = (torch.tensor(bf16["confusion_matrix"]) - torch.tensor(ref["confusion_matrix"]))
    assert moved.abs().sum() / 2 <= 0.01 * 2 * 2 * 48 * 48
    assert bf16["loss"] == pytest.approx(ref["loss"], rel=1e-2)
    assert bf16["loss"] != ref["loss"]
