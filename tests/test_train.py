"""The functional train step against the imperative nn.Module + torch.optim loop, and the
step's contract: pure, frozen sub-networks untouched, compile gives the same numbers."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import torch

from seg import functional, losses, metrics, models, optim
from seg import train as seg_train


def unet_cfg(**kw):
    return ml_collections.ConfigDict(dict(name="unet", base_channels=8, depth=3, bilinear=False,
                                          dropout=0.5, **kw))


def pspnet_cfg(**kw):
    return ml_collections.ConfigDict(dict(name="pspnet", backbone="resnet18", output_stride=8,
                                          bins=(1, 2, 3, 6), pool="avg", dropout=0.1, aux=True,
                                          **kw))


def batches(n, b=2, size=(40, 48), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        masks = torch.randint(0, k, (b, *size), generator=g)
        masks[:, :3] = 255  # an ignore band, as the real data has
        out.append((torch.randn(b, 3, *size, generator=g), masks))
    return out


def functional_run(model_cfg, make_opt, steps, *, aux_weight, grad_impl="autograd", freeze=(),
                   compile=False, donate=False, seed=0, dtype=torch.float32):
    model, params, buffers = functional.init(lambda: models.build(model_cfg, 3), seed=seed)
    params = {k: v.to(dtype) for k, v in params.items()}
    buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in buffers.items()}
    optimizer, schedule = make_opt()
    trainable, _ = functional.split_trainable(params, freeze)
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer, schedule,
                                     trainable=trainable, frozen_modules=freeze,
                                     aux_weight=aux_weight, grad_impl=grad_impl, compile=compile,
                                     donate=donate)
    state = seg_train.init_state(params, buffers, optimizer, trainable)
    torch.manual_seed(123)  # dropout
    loss_history = []
    for images, masks in batches(steps):
        state, m = step(state, (images.to(dtype), masks))
        loss_history.append(m["loss"])
    return state, torch.stack(loss_history)


def imperative_run(model_cfg, make_torch_opt, steps, *, aux_weight, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.build(model_cfg, 3).train()
    opt, sched = make_torch_opt(model.parameters())
    torch.manual_seed(123)
    loss_history = []
    for images, masks in batches(steps):
        opt.zero_grad()
        loss = losses.total_loss(model(images), masks, losses.cross_entropy, aux_weight)
        loss.backward()
        opt.step()
        sched.step()
        loss_history.append(loss.detach())
    return model, torch.stack(loss_history)


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors."""
    ia, ib = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # sign-magnitude -> ordered integers
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("which", ["pspnet_sgd", "unet_adam"])
def test_functional_step_matches_imperative_loop(which):
    steps = 6
    if which == "pspnet_sgd":
        cfg, aux = pspnet_cfg(), 0.4
        make_opt = lambda: (optim.sgd(optim.poly(0.05, steps), momentum=0.9, weight_decay=1e-4),
                            optim.poly(0.05, steps))
        def make_torch_opt(p):
            o = torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4)
            return o, torch.optim.lr_scheduler.PolynomialLR(o, total_iters=steps, power=0.9)
    else:
        cfg, aux = unet_cfg(), 0.0
        make_opt = lambda: (optim.adam(optim.constant(1e-3)), optim.constant(1e-3))
        def make_torch_opt(p):
            o = torch.optim.Adam(p, lr=1e-3)
            return o, torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)

    state, f_losses = functional_run(cfg, make_opt, steps, aux_weight=aux)
    model, i_losses = imperative_run(cfg, make_torch_opt, steps, aux_weight=aux)

    ref = dict(model.named_parameters())
    # Same weights, batches, dropout masks and update arithmetic: bitwise equal, not just close.
    assert torch.equal(f_losses, i_losses), (f_losses - i_losses).abs().max()
    worst = max(max_ulp(state.params[k], ref[k].detach()) for k in ref)
    assert worst == 0, f"params differ by up to {worst} ulp"
    for k, v in model.named_buffers():
        assert torch.equal(state.buffers[k], v), k
    assert set(state.params) == set(ref) and int(state.step) == steps


def test_grad_impls_agree():
    make_opt = lambda: (optim.sgd(optim.constant(0.05), momentum=0.9), optim.constant(0.05))
    a, la = functional_run(unet_cfg(), make_opt, 3, aux_weight=0.0, grad_impl="autograd")
    b, lb = functional_run(unet_cfg(), make_opt, 3, aux_weight=0.0, grad_impl="func")
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=0)


@pytest.mark.parametrize("make_opt", [
    lambda: (optim.sgd(optim.constant(0.05), momentum=0.9, nesterov=True, weight_decay=1e-4),
             optim.constant(0.05)),
    lambda: (optim.adamw(optim.constant(1e-3)), optim.constant(1e-3))], ids=["sgd", "adamw"])
def test_donated_state_gives_the_same_numbers(make_opt):
    a, la = functional_run(unet_cfg(), make_opt, 3, aux_weight=0.0)
    b, lb = functional_run(unet_cfg(), make_opt, 3, aux_weight=0.0, donate=True)
    assert torch.equal(la, lb)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    for x, y in zip(torch.utils._pytree.tree_leaves(a.opt_state),
                    torch.utils._pytree.tree_leaves(b.opt_state)):
        assert torch.equal(x, y)


def test_step_is_pure_and_counts_with_tensors():
    model, params, buffers = functional.init(lambda: models.build(pspnet_cfg(), 3), seed=0)
    optimizer, schedule = optim.sgd(optim.constant(0.1), momentum=0.9), optim.constant(0.1)
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer, schedule,
                                     trainable=list(params), aux_weight=0.4)
    state = seg_train.init_state(params, buffers, optimizer, list(params))
    before = {k: v.clone() for k, v in {**state.params, **state.buffers}.items()}
    new, m = step(state, batches(1)[0])
    for k, v in {**state.params, **state.buffers}.items():
        assert torch.equal(v, before[k]), f"{k} was mutated"
    assert new.step.dim() == 0 and new.step.dtype == torch.int64 and int(new.step) == 1
    assert m["loss"].dim() == 0 and m["lr"].dim() == 0
    changed = [k for k in new.buffers if "running_mean" in k
               and not torch.equal(new.buffers[k], state.buffers[k])]
    assert changed, "BatchNorm statistics were not returned in the new state"


def test_frozen_backbone_gets_no_update_and_keeps_bn_stats():
    make_opt = lambda: (optim.sgd(optim.constant(0.1), momentum=0.9), optim.constant(0.1))
    model, params, buffers = functional.init(lambda: models.build(pspnet_cfg(), 3), seed=0)
    state, _ = functional_run(pspnet_cfg(), make_opt, 2, aux_weight=0.4, freeze=("backbone",))
    trainable, frozen = functional.split_trainable(params, ["backbone"])
    assert frozen and all(k.startswith("backbone.") for k in frozen)
    for k in frozen:
        assert torch.equal(state.params[k], params[k])
    for k in buffers:
        if k.startswith("backbone."):
            assert torch.equal(state.buffers[k], buffers[k]), k
    assert any(not torch.equal(state.params[k], params[k]) for k in trainable)
    flat = torch.utils._pytree.tree_leaves(state.opt_state)
    n_state = sum(x.numel() for x in flat if x.dim() > 0)
    assert n_state == sum(params[k].numel() for k in trainable)  # momentum for trainable only


def test_compiled_step_matches_eager():
    """Inductor fuses and reorders the step's arithmetic, so compiled and eager are not bitwise
    equal, and in float32 Adam turns the difference into anything up to a whole update: where a
    gradient is near 0, m / (sqrt(v) + eps) is a ratio of two rounding-sized numbers. In float64
    the reordering errors are ~1e-16 relative, ~1e-13 after the sums of a convolution's backward;
    such a relative error in a gradient is the same relative error in an Adam update while
    |g| >> eps, so over 3 steps of lr 1e-2 the parameters agree to ~1e-14 (9e-15 measured on
    torch 2.14) and the losses to ~1e-16 relative. The tolerances leave two orders of magnitude
    on the parameters and four on the losses."""
    cfg = ml_collections.ConfigDict(dict(name="unet", base_channels=4, depth=1, bilinear=True,
                                         dropout=0.0))
    make_opt = lambda: (optim.adamw(optim.poly(1e-2, 3)), optim.poly(1e-2, 3))
    run = lambda **kw: functional_run(cfg, make_opt, 3, aux_weight=0.0, grad_impl="func",
                                      dtype=torch.float64, **kw)
    init = functional.init(lambda: models.build(cfg, 3), seed=0)[1]
    eager, le = run()
    torch._dynamo.reset()
    compiled, lc = run(compile=True)
    torch.testing.assert_close(lc, le, rtol=1e-12, atol=0)
    for k in eager.params:
        moved = (eager.params[k] - init[k].double()).abs().max()
        assert moved > 0 or "outc" not in k, k  # the step did change the parameters
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=0, atol=1e-12)


def test_evaluate_matches_direct_computation():
    model, params, buffers = functional.init(lambda: models.build(unet_cfg(), 3), seed=0)
    eval_step = seg_train.make_eval_step(model, losses.cross_entropy, 3)
    data = batches(3, b=3)
    result = seg_train.evaluate(eval_step, params, buffers, data)
    # Reference: the module in eval mode with numpy bookkeeping.
    ref_model = models.build(unet_cfg(), 3)
    ref_model.load_state_dict({**params, **buffers})
    ref_model.eval()
    cm = np.zeros((3, 3), dtype=np.int64)
    loss_sum, pixels = 0.0, 0
    with torch.no_grad():
        for images, masks in data:
            logits = ref_model(images)["out"]
            pred = logits.argmax(1).numpy().ravel()
            t = masks.numpy().ravel()
            keep = t != 255
            np.add.at(cm, (t[keep], pred[keep]), 1)
            loss_sum += torch.nn.functional.cross_entropy(
                logits.double(), masks, ignore_index=255, reduction="sum").item()
            pixels += int(keep.sum())
    assert result["confusion_matrix"] == cm.tolist()
    assert result["pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum())
    # the split's loss: the mean over all its valid pixels, not a mean of batch means
    assert result["loss"] == pytest.approx(loss_sum / pixels, rel=1e-6)
    assert result["miou"] == pytest.approx(metrics.scores(torch.tensor(cm))["miou"])


def test_grad_norm_and_clipping_match_clip_grad_norm_in_an_imperative_loop():
    """The step's grad_norm is clip_grad_norm_'s total norm and optimizer.clip_norm clips as it
    does: same operations, so the losses, norms and params agree bit for bit."""
    steps, clip = 3, 0.02   # the norms are 0.025-0.03 here
    model, params, buffers = functional.init(lambda: models.build(unet_cfg(), 3), seed=0)
    optimizer = optim.sgd(0.05, momentum=0.9, weight_decay=1e-4)
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer, optim.constant(0.05),
                                     trainable=list(params), clip_norm=clip)
    state = seg_train.init_state(params, buffers, optimizer, list(params))
    torch.manual_seed(123)  # dropout
    norms = []
    for batch in batches(steps):
        state, m = step(state, batch)
        norms.append(m["grad_norm"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = models.build(unet_cfg(), 3).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4,
                          foreach=True)
    torch.manual_seed(123)
    ref_norms = []
    for images, masks in batches(steps):
        opt.zero_grad()
        losses.total_loss(ref(images), masks, losses.cross_entropy, 0.0).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip, foreach=True))
        opt.step()
    assert torch.equal(torch.stack(norms), torch.stack(ref_norms))
    assert min(norms) > clip   # every step was clipped
    for k, v in ref.named_parameters():
        assert torch.equal(state.params[k], v.detach()), k


def test_fused_optimizers_and_negative_clip_norms_are_refused_where_they_cannot_work():
    model, params, _ = functional.init(lambda: models.build(unet_cfg(), 3), seed=0)
    make = lambda opt, **kw: seg_train.make_train_step(
        model, losses.cross_entropy, opt, optim.constant(0.1), trainable=list(params), **kw)
    with pytest.raises(ValueError, match="optimizer.fused=True.*compile"):
        make(optim.adamw(1e-3, fused=True), compile=True)
    with pytest.raises(ValueError, match="optimizer.clip_norm=-1.0"):
        make(optim.sgd(0.1), clip_norm=-1.0)
