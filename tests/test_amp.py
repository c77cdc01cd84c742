"""fp16 mixed precision: the dynamic loss scale (seg/amp.py) against torch.amp.GradScaler, and
the fp16 train step against an imperative autocast + GradScaler loop, on the CPU (float16
autocast and GradScaler("cpu") run there in torch >= 2.3)."""
from __future__ import annotations

import math

import ml_collections
import pytest
import torch

from seg import amp, functional, losses, models, optim
from seg import train as seg_train

pytestmark = pytest.mark.usefixtures("one_thread")


def scaler_decisions(grads_seq, rule: amp.LossScale):
    """(scale used, growth counter after, step skipped) per step, from torch.amp.GradScaler
    driving torch.optim.SGD on one parameter whose unscaled gradient is grads_seq[i]."""
    param = torch.zeros(len(grads_seq[0]), requires_grad=True)
    opt = torch.optim.SGD([param], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=rule.init_scale,
                                  growth_factor=rule.growth_factor,
                                  backoff_factor=rule.backoff_factor,
                                  growth_interval=rule.growth_interval)
    out = []
    for g in grads_seq:
        scale = scaler.get_scale()
        opt.zero_grad(set_to_none=True)
        scaler.scale((param * g).sum()).backward()   # param.grad = scale * g
        before = param.detach().clone()
        scaler.unscale_(opt)
        unscaled = param.grad.clone()
        scaler.step(opt)
        scaler.update()
        out.append((scale, int(scaler._growth_tracker), torch.equal(param.detach(), before),
                    unscaled))
    return out


def our_decisions(grads_seq, rule: amp.LossScale):
    state, out = rule.init(), []
    for g in grads_seq:
        scale = state["scale"]
        unscaled = amp.unscale([g * scale], scale)
        found_inf = amp.overflowed(unscaled)
        state = rule.update(state, found_inf)
        out.append((float(scale), int(state["growth"]), bool(found_inf), unscaled[0]))
    return out


def gradients(pattern: str, size: float = 1.0):
    """'.' a clean gradient (normal, times `size`), 'i' one holding an inf, 'n' a NaN, 'b' a
    finite but huge one (1e30 once scaled: its square overflows float32, GradScaler still
    takes the step)."""
    g = torch.Generator().manual_seed(0)
    seq = []
    for c in pattern:
        x = torch.randn(5, generator=g) * size
        if c == "i":
            x[2] = math.inf
        elif c == "n":
            x[4] = math.nan
        elif c == "b":
            x[1] = 1e30 / 65536
        seq.append(x)
    return seq


@pytest.mark.parametrize("pattern, rule, size", [
    ("..i...n.ii......b..", amp.LossScale(growth_interval=3), 1.0),
    # capped at 2**127 (the next doubling is inf); gradients small enough to stay finite there
    ("....i....", amp.LossScale(init_scale=2.0 ** 125, growth_interval=1), 1e-4),
    # factors that are not powers of two: the products round, and must round alike
    ("...i.", amp.LossScale(init_scale=3.0, growth_factor=1.7, backoff_factor=0.3,
                            growth_interval=2), 1.0),
], ids=["default_factors", "float32_ceiling", "odd_factors"])
def test_loss_scale_makes_grad_scalers_decisions(pattern, rule, size):
    grads = gradients(pattern, size)
    ours, theirs = our_decisions(grads, rule), scaler_decisions(grads, rule)
    assert [d[:3] for d in ours] == [d[:3] for d in theirs]   # scale, counter, skipped
    assert [d[2] for d in ours] == [c in "in" for c in pattern]
    for a, b in zip(ours, theirs):   # the unscaled gradients, bit for bit (NaN where NaN)
        torch.testing.assert_close(a[3], b[3], rtol=0, atol=0, equal_nan=True)


def test_the_scale_stops_below_float32_overflow():
    rule = amp.LossScale(init_scale=2.0 ** 126, growth_interval=1)
    state = rule.init()
    for _ in range(3):
        state = rule.update(state, torch.tensor(False))
    assert float(state["scale"]) == 2.0 ** 127


UNET = ml_collections.ConfigDict(dict(name="unet", base_channels=4, depth=2, bilinear=False,
                                      dropout=0.5))


def batches(n, overflow_at=None, b=2, size=(32, 32)):
    """n batches; at step `overflow_at` (1-based) one pixel is 1e5, beyond float16's largest
    number (65504): the autocast forward turns it into inf, and the step overflows."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(1, n + 1):
        masks = torch.randint(0, 3, (b, *size), generator=g)
        masks[:, :2] = 255
        images = torch.randn(b, 3, *size, generator=g)
        if i == overflow_at:
            images[0, 0, 5, 5] = 1e5
        out.append((images, masks))
    return out


def functional_fp16(data, rule):
    model, params, buffers = functional.init(lambda: models.build(UNET, 3), seed=0)
    optimizer = optim.sgd(0.05, momentum=0.9, weight_decay=1e-4)
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer,
                                     optim.constant(0.05), trainable=list(params),
                                     precision="fp16", loss_scale=rule)
    state = seg_train.init_state(params, buffers, optimizer, list(params), loss_scale=rule)
    torch.manual_seed(123)  # dropout
    history = []
    for batch in data:
        before = state
        state, m = step(state, batch)
        history.append({k: m[k].clone() for k in ("loss", "loss_scale", "overflow", "finite")})
        history[-1]["growth"] = int(state.loss_scale["growth"])
        history[-1]["state"] = (before, state)
    return state, history


def imperative_fp16(data, rule):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build(UNET, 3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4,
                          foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=rule.init_scale,
                                  growth_interval=rule.growth_interval)
    torch.manual_seed(123)
    history = []
    for images, masks in data:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(images)
        out = {k: v.float() for k, v in out.items()}   # as seg.train: the loss in float32
        loss = losses.total_loss(out, masks, losses.cross_entropy, 0.0)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append({"loss": loss.detach(), "scale": scale,
                        "growth": int(scaler._growth_tracker)})
    return model, history


def test_fp16_step_skips_the_overflowing_step_and_matches_grad_scaler():
    rule = amp.LossScale(growth_interval=2)
    data = batches(5, overflow_at=3)
    state, ours = functional_fp16(data, rule)
    model, ref = imperative_fp16(data, rule)

    assert [bool(h["overflow"]) for h in ours] == [False, False, True, False, False]
    # grows after 2 clean steps, halves at the overflow, grows again after 2 more
    assert [float(h["loss_scale"]) for h in ours] == [2.0 ** 16, 2.0 ** 16, 2.0 ** 17,
                                                      2.0 ** 16, 2.0 ** 16]
    assert float(state.loss_scale["scale"]) == 2.0 ** 17
    assert [float(h["loss_scale"]) for h in ours] == [h["scale"] for h in ref]
    assert [h["growth"] for h in ours] == [h["growth"] for h in ref]
    # the skipped step left params, BatchNorm statistics and optimizer state as they were
    before, after = ours[2]["state"]
    for tree in ("params", "buffers", "opt_state"):
        for x, y in zip(torch.utils._pytree.tree_leaves(getattr(before, tree)),
                        torch.utils._pytree.tree_leaves(getattr(after, tree))):
            assert torch.equal(x, y), tree
    assert int(after.step) == 3
    # the clean steps trained, and in the same float16 arithmetic as the imperative loop
    assert all(bool(h["finite"]) for i, h in enumerate(ours) if i != 2)
    assert not bool(ours[2]["finite"])   # the inf pixel reached the loss too
    for i in (0, 1, 3, 4):
        assert torch.equal(ours[i]["loss"], ref[i]["loss"]), i
    ref_params = dict(model.named_parameters())
    for k, v in state.params.items():
        assert torch.equal(v, ref_params[k].detach()), k
        assert v.dtype == torch.float32
    p0 = functional.init(lambda: models.build(UNET, 3), seed=0)[1]
    assert any(not torch.equal(state.params[k], p0[k]) for k in p0)
    # GradScaler's loop keeps the skipped forward's BatchNorm update (non-finite here); ours
    # left the statistics of step 2, so every buffer stays finite
    assert all(torch.isfinite(v).all() for v in state.buffers.values())


def test_a_too_large_scale_backs_off_while_the_loss_stays_finite():
    # 2**40 turns the float16 gradients of this batch into infs: the loss is finite, every step
    # overflows and halves the scale until the gradients fit, as GradScaler does.
    rule = amp.LossScale(init_scale=2.0 ** 40)
    data = batches(4)
    _, ours = functional_fp16(data, rule)
    _, ref = imperative_fp16(data, rule)
    assert [float(h["loss_scale"]) for h in ours] == [h["scale"] for h in ref]
    assert all(bool(h["finite"]) for h in ours)
    assert bool(ours[0]["overflow"])
    assert float(ours[-1]["loss_scale"]) < 2.0 ** 40


def test_fp16_needs_a_loss_scale_in_the_state():
    model, params, buffers = functional.init(lambda: models.build(UNET, 3), seed=0)
    optimizer = optim.sgd(0.05)
    step = seg_train.make_train_step(model, losses.cross_entropy, optimizer,
                                     optim.constant(0.05), trainable=list(params),
                                     precision="fp16")
    state = seg_train.init_state(params, buffers, optimizer, list(params))
    with pytest.raises(ValueError, match="fp16.*loss scale"):
        step(state, batches(1)[0])


def test_fp16_eval_gives_float32_logits_close_to_fp32():
    model, params, buffers = functional.init(lambda: models.build(UNET, 3), seed=0)
    functional.set_mode(model, train=False)
    images = batches(1)[0][0]
    ref = seg_train.make_infer(model)(params, buffers, images)
    half = seg_train.make_infer(model, precision="fp16")(params, buffers, images)
    assert half.dtype == torch.float32 and not torch.equal(half, ref)
    # float16 rounds at 2**-11 relative; a few layers of it stay well inside 1e-2
    torch.testing.assert_close(half, ref, rtol=1e-2, atol=1e-2)


def test_autocast_support_is_detected():
    # float16 and bfloat16 autocast run on this torch's CPU (the tests above need them);
    # float64 is no autocast type anywhere
    assert amp.autocast_supported("cpu") and amp.autocast_supported("cpu", torch.bfloat16)
    assert not amp.autocast_supported("cpu", torch.float64)


@pytest.mark.parametrize("bad, message", [
    (amp.LossScale(init_scale=0.0), "train.loss_scale=0.0"),
    (amp.LossScale(growth_interval=0), "train.loss_scale_growth_interval=0"),
])
def test_bad_loss_scale_settings_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        bad.check()


def test_an_fp16_run_logs_its_scale_and_saves_it(tmp_path, shared_synthetic_data):
    from configs import unet
    from seg import loop, rundir

    cfg = unet.get_config()
    cfg.model.update(base_channels=4, depth=2)
    cfg.data.update(image_size=32, num_train=16, num_val=8, num_test=8)
    cfg.train.update(steps=4, batch_size=4, eval_every=4, log_every=2, checkpoint_every=4,
                     eval_batch_size=8, precision="fp16", loss_scale=1024.0,
                     loss_scale_growth_interval=3)
    loop.train_and_evaluate(cfg, tmp_path)
    train = [r for r in rundir.load(tmp_path).records if r["split"] == "train"]
    # 1024 for steps 1-3, then 2048: the records hold the last step's scale
    assert [(r["loss_scale"], r["overflows"]) for r in train] == [(1024.0, 0), (2048.0, 0)]
    saved = torch.load(tmp_path / "checkpoints" / "ckpt_00000004.pt", weights_only=True)
    assert float(saved["state"]["loss_scale"]["scale"]) == 2048.0
    assert int(saved["state"]["loss_scale"]["growth"]) == 1
