"""train.num_seeds (seg/seeds.py): K models in one vmapped train step, each checked against a
separate run of its seed: its dropout noise bitwise, its optimizer arithmetic bitwise against
torch.optim, its batches bitwise, and its whole step to the rounding of batched kernels."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from configs import common, unet
from seg import errors, functional, losses, models, optim, seeds
from seg import train as steps
from seg.data import augment, batches

from conftest import palette_coded

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """conv-BN-ReLU, element-wise dropout, conv-BN-ReLU, feature-map dropout, 1x1 conv: both
    kinds of dropout the members draw, and BatchNorm in train mode."""

    def __init__(self, num_outputs: int = 3):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                               nn.ReLU(), nn.Dropout(0.3))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                               nn.ReLU(), nn.Dropout2d(0.5))
        self.head = nn.Conv2d(8, num_outputs, 1)

    def forward(self, x):
        return {"out": self.head(self.b(self.a(x)))}


def tiny_unet():
    c = unet.get_config().model
    c.base_channels, c.depth, c.dropout = 4, 2, 0.5  # Dropout2d after both downs
    return models.build(c, 3)


BUILDERS = {"tiny": TinyNet, "unet": tiny_unet}


def batches_of(k: int, n: int, size: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(k, batch, 3, size, size, generator=g),
             torch.randint(0, 3, (k, batch, size, size), generator=g)) for _ in range(n)]


def separate_run(build, seed, data, k, optimizer, **options):
    """A separate run of `seed` on member k's batches, as the loop runs it: its dropout draws
    from the global generator seeded with the seed (seg.tracking.DropoutRng)."""
    model, params, buffers = functional.init(build, seed=seed)
    step = steps.make_train_step(model, losses.cross_entropy, optimizer, optim.constant(0.1),
                                 trainable=list(params), **options)
    state = steps.init_state(params, buffers, optimizer, list(params),
                             channels_last=options.get("channels_last", False))
    first, out = state, []
    torch.manual_seed(seed)
    for images, masks in data:
        state, m = step(state, (images[k], masks[k]))
        out.append(m["loss"])
    return first, state, torch.stack(out)


def vmapped_run(build, seeds_, data, optimizer, rng_seeds=None, **options):
    inits = [functional.init(build, seed=s) for s in seeds_]
    model, trainable = inits[0][0], list(inits[0][1])
    state = seeds.stack_states([steps.init_state(p, b, optimizer, trainable,
                                                 channels_last=options.get("channels_last",
                                                                           False))
                                for _, p, b in inits])
    step = seeds.make_train_step(model, losses.cross_entropy, optimizer, optim.constant(0.1),
                                 trainable=trainable, **options)
    rngs = [seeds.SeedRng(s, CPU) for s in (rng_seeds or seeds_)]
    out = []
    for batch in data:
        state, m = step(state, batch, rngs)
        out.append(m["loss"])
    return state, torch.stack(out, 1)


def flat(tree: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in tree.values()])


# ---------------------------------------------------------------- dropout noise, bitwise


@pytest.mark.parametrize("feature", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_member_noise_is_what_dropout_draws(feature, dtype, channels_last):
    """A member's draws equal F.dropout / F.dropout2d's in a separate run of its seed (the same
    masks, the same scaled values, bitwise), call after call, and leave its generator where
    the separate run's is left; the global generator is untouched."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 6, 5, 7, generator=g).to(dtype), torch.randn(2, 6, 3, 3, generator=g)]
    if channels_last:  # element-wise noise follows its input's layout (empty_like)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    drop = F.dropout2d if feature else F.dropout
    torch.manual_seed(7)
    expected = [drop(x, 0.4, True) for x in xs]
    after = torch.get_rng_state()
    outside = torch.get_rng_state()
    rng = seeds.SeedRng(7, CPU)
    calls = [seeds.DropoutCall("d", i, tuple(x.shape), x.stride(), x.dtype, 0.4, feature)
             for i, x in enumerate(xs)]
    noise = rng.draw(calls)
    for x, n, e in zip(xs, noise, expected):
        assert torch.equal(x * n, e)
    assert torch.equal(rng.state_dict()[0]["torch"], after)
    assert torch.equal(torch.get_rng_state(), outside)


def test_probe_finds_each_draw_and_changes_nothing():
    """UNet's one Dropout2d module drops two levels: two draws, told apart by shape; the probe
    leaves the generator and the buffers as they were, and frozen modules draw nothing."""
    model, params, buffers = functional.init(tiny_unet, seed=0)
    forward = steps._forward(model, "fp32", False)
    x = torch.randn(2, 3, 16, 16)
    before, kept = torch.get_rng_state(), {k: v.clone() for k, v in buffers.items()}
    functional.set_mode(model, train=True)
    calls = seeds.probe_dropout(model, lambda: forward(params, buffers, x), x.device)
    assert [(c.key, c.shape, c.feature) for c in calls] == [
        ("dropout.mask0", (2, 8, 8, 8), True), ("dropout.mask1", (2, 16, 4, 4), True)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(buffers[k], v) for k, v in kept.items())
    functional.set_mode(model, train=True, frozen=("dropout",))
    assert seeds.probe_dropout(model, lambda: forward(params, buffers, x), x.device) == []


# ---------------------------------------------------------------- state and optimizer, bitwise


def test_stacking_round_trips_bitwise_with_layouts():
    optimizer = optim.sgd(0.1, momentum=0.9)
    states = []
    for s in range(3):
        _, p, b = functional.init(TinyNet, seed=s)
        states.append(steps.init_state(p, b, optimizer, list(p), channels_last=True))
    stacked = seeds.stack_states(states)
    assert stacked.params["a.0.weight"].shape == (3, 8, 3, 3, 3)
    assert stacked.opt_state["count"].shape == ()  # shared: the members step together
    for k, s in enumerate(states):
        got = seeds.member_state(stacked, k)
        for part in ("params", "buffers"):
            for name, v in getattr(s, part).items():
                assert torch.equal(getattr(got, part)[name], v)
                assert getattr(got, part)[name].stride() == v.stride(), name  # channels_last
                assert getattr(got, part)[name].storage_offset() == 0  # a copy, not a slice
        assert all(torch.equal(got.opt_state["momentum"][n], v)
                   for n, v in s.opt_state["momentum"].items())
    late = states[1]._replace(step=states[1].step + 1)
    with pytest.raises(ValueError, match="steps differ"):
        seeds.stack_states([states[0], late])


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_stacked_update_is_torch_optim_per_member(name):
    """The pure optimizer stepping K stacked members at once gives each member exactly what
    torch.optim gives it alone: the update is element-wise."""
    make = {"sgd": (lambda: optim.sgd(optim.poly(0.1, 10), momentum=0.9, nesterov=True,
                                      weight_decay=1e-3),
                    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                               weight_decay=1e-3)),
            "adam": (lambda: optim.adam(1e-2, weight_decay=1e-3),
                     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3)),
            "adamw": (lambda: optim.adamw(1e-2),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2))}[name]
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (6, 4, 3, 3), "b": (37,), "m": (5, 7)}   # odd sizes: vector tails too
    members = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    grads = [[{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
             for _ in range(4)]
    optimizer = make[0]()
    state = steps.init_state(members[0], {}, optimizer, list(shapes))
    stacked = seeds.stack_states([steps.init_state(m, {}, optimizer, list(shapes))
                                  for m in members])
    update = steps.make_update(optimizer, optim.constant(0.0))
    for step_grads in grads:
        g_stacked = {k: seeds.stack([gr[k] for gr in step_grads]) for k in shapes}
        stacked, _ = update(stacked, stacked.params, g_stacked, {"loss": torch.zeros(3)}, {})
    del state
    for k, member in enumerate(members):
        ps = [nn.Parameter(member[n].clone()) for n in shapes]
        opt = make[1](ps)
        if name == "sgd":  # torch's PolynomialLR, as optim.poly's closed form
            sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=0.9)
        for step_grads in grads:
            for p, n in zip(ps, shapes):
                p.grad = step_grads[k][n].clone()
            opt.step()
            if name == "sgd":
                sched.step()
        for p, n in zip(ps, shapes):
            assert torch.equal(stacked.params[n][k], p.detach()), (name, k, n)


# ---------------------------------------------------------------- the vmapped step


# Why these tolerances. Member k's step computes what the separate run computes, from bitwise
# the same params, batches and dropout noise; only the summation order inside the batched
# kernels differs (a convolution over K models is one grouped convolution; BatchNorm reduces
# K models' channels at once). Reordering a float32 sum of n terms moves it by at most about
# n * 2**-24 of the sum of the terms' magnitudes (Higham, Accuracy and Stability of Numerical
# Algorithms, 2002, ch. 4). Here the longest sums are a backward convolution's over a batch
# (2 images x 16 x 16 pixels = 512 terms: 512 * 2**-24 = 3e-5) and BatchNorm's over the same
# pixels; through at most 12 layers (the tiny UNet) and 2 steps that is 12 * 2 * 3e-5 = 7e-4:
# RTOL = 1e-3 bounds the relative change of the losses, the updates and the BatchNorm
# statistics. (Measured: ~1e-6.) A wrong dropout mask changes the update by ~90% (the negative
# control below), so the tolerance still tells masks apart.
RTOL = 1e-3


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model", ["tiny", "unet"])
@pytest.mark.parametrize("grad_impl", ["autograd", "func"])
def test_each_member_is_its_separate_run(model, grad_impl):
    build, data, optimizer = BUILDERS[model], batches_of(3, 2), optim.sgd(0.1)
    state, losses_ = vmapped_run(build, [5, 6, 7], data, optimizer, grad_impl=grad_impl)
    for k, seed in enumerate([5, 6, 7]):
        first, ref, ref_losses = separate_run(build, seed, data, k, optimizer)
        got = seeds.member_state(state, k)
        assert torch.allclose(losses_[k], ref_losses, rtol=RTOL, atol=0)
        # the update (plain SGD: -0.1 x the summed gradients) and the BN statistics
        assert relative(flat(got.params) - flat(first.params),
                        flat(ref.params) - flat(first.params)) < RTOL
        running = {n: v for n, v in ref.buffers.items() if "running" in n}
        assert relative(flat({n: got.buffers[n] for n in running}), flat(running)) < RTOL
        assert all(torch.equal(got.buffers[n], v) for n, v in ref.buffers.items()
                   if "num_batches" in n)


def test_the_tolerance_tells_dropout_masks_apart():
    """Negative control: members given each other's dropout streams miss their separate runs
    by far more than RTOL."""
    data, optimizer = batches_of(2, 1), optim.sgd(0.1)
    state, _ = vmapped_run(TinyNet, [5, 6], data, optimizer, rng_seeds=[6, 5])
    first, ref, _ = separate_run(TinyNet, 5, data, 0, optimizer)
    got = seeds.member_state(state, 0)
    assert relative(flat(got.params) - flat(first.params),
                    flat(ref.params) - flat(first.params)) > 100 * RTOL


def test_channels_last_members_are_their_separate_runs():
    data, optimizer = batches_of(2, 2), optim.sgd(0.1)
    state, losses_ = vmapped_run(TinyNet, [0, 1], data, optimizer, channels_last=True)
    for k in range(2):
        first, ref, ref_losses = separate_run(TinyNet, k, data, k, optimizer, channels_last=True)
        got = seeds.member_state(state, k)
        assert got.params["a.0.weight"].is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(losses_[k], ref_losses, rtol=RTOL, atol=0)
        assert relative(flat(got.params) - flat(first.params),
                        flat(ref.params) - flat(first.params)) < RTOL


def output_dtypes(model, run) -> list:
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_bf16_members_cast_as_autocast_does():
    """Under vmap a convolution escapes autocast and BatchNorm refuses mixed dtypes; the
    members' copy of the model casts itself, so every convolution and BatchNorm returns the
    dtype it returns in a separate bf16 run, and the step's numbers agree to bf16 rounding:
    bf16 keeps 8 significant bits, so a layer whose sums round differently moves its outputs
    by up to 2**-8 = 3.9e-3 relative, and the 3 convolutions that round to bf16 move the
    update by up to ~1.2e-2 (loss: 1e-2); 5e-2 for the update leaves a factor 4 (measured:
    3e-3), far below the ~90% of wrong masks."""
    data, optimizer = batches_of(2, 1), optim.sgd(0.1)
    model, params, buffers = functional.init(TinyNet, seed=0)
    functional.set_mode(model, train=True)
    forward = steps._forward(model, "bf16", False)
    expected = output_dtypes(model, lambda: forward(params, buffers, data[0][0][0]))
    assert torch.bfloat16 in expected and torch.float32 not in expected[:1]
    copy = seeds.mapped_copy(model, [])
    mapped = steps._forward(copy, "bf16", False)
    stacked = [{k: torch.stack([v, v]) for k, v in tree.items()} for tree in (params, buffers)]
    got = output_dtypes(copy, lambda: torch.func.vmap(mapped, randomness="different")(
        *stacked, data[0][0]))  # dtypes only: any dropout draws will do
    assert got == expected
    state, losses_ = vmapped_run(TinyNet, [0, 1], data, optimizer, precision="bf16")
    for k in range(2):
        first, ref, ref_losses = separate_run(TinyNet, k, data, k, optimizer, precision="bf16")
        got = seeds.member_state(state, k)
        assert torch.allclose(losses_[k], ref_losses, rtol=1e-2, atol=0)
        assert relative(flat(got.params) - flat(first.params),
                        flat(ref.params) - flat(first.params)) < 5e-2


def test_compiled_members_are_their_separate_runs():
    """torch.compile of the whole vmapped step (aot_eager here: graph capture on the CPU in
    seconds; inductor is what train.compile=True uses), against eager separate runs."""
    data, optimizer = batches_of(2, 2), optim.sgd(0.1)
    state, losses_ = vmapped_run(TinyNet, [0, 1], data, optimizer, compile="aot_eager")
    for k in range(2):
        first, ref, ref_losses = separate_run(TinyNet, k, data, k, optimizer)
        got = seeds.member_state(state, k)
        assert torch.allclose(losses_[k], ref_losses, rtol=RTOL, atol=0)
        assert relative(flat(got.params) - flat(first.params),
                        flat(ref.params) - flat(first.params)) < RTOL


# ---------------------------------------------------------------- what cannot run stacked


class RandomInForward(TinyNet):
    def forward(self, x):
        return super().forward(x + 0.01 * torch.randn_like(x))


class TwiceSameShape(TinyNet):
    def forward(self, x):
        y = self.a(x)
        return {"out": self.head(self.b[3](self.b[3](y)))}


@pytest.mark.parametrize("options, match", [
    ({"skip_nonfinite": True}, "nonfinite='skip'"),
    ({"checkpoint_activations": True}, "checkpoint_activations"),
    ({"grad_reduce": lambda g, s: (g, s)}, "separate jobs"),
    ({"precision": "fp16"}, "train.precision"),
])
def test_options_that_cannot_run_stacked_are_refused(options, match):
    model, params, _ = functional.init(TinyNet, seed=0)
    with pytest.raises(ValueError, match=match):
        seeds.make_train_step(model, losses.cross_entropy, optim.sgd(0.1), optim.constant(0.1),
                              trainable=list(params), **options)


@pytest.mark.parametrize("build, error, match", [
    (RandomInForward, errors.ConfigError, "random numbers outside nn.Dropout"),
    (TwiceSameShape, ValueError, "of one shape"),
    (lambda: nn.Sequential(TinyNet(), nn.AlphaDropout(0.1)), ValueError, "AlphaDropout"),
])
def test_models_whose_randomness_cannot_be_drawn_per_member(build, error, match):
    with pytest.raises(error, match=match):
        vmapped_run(build, [0, 1], batches_of(2, 1), optim.sgd(0.1))


class Upsampled(TinyNet):
    def forward(self, x):
        return {"out": F.interpolate(super().forward(x[..., ::2, ::2])["out"], scale_factor=2,
                                     mode="bilinear")}


def test_compiled_channels_last_interpolation_is_a_one_line_error():
    """torch 2.14 cannot compile bilinear interpolation of channels_last tensors under vmap
    (a channels_last clone inside vmap): named, not a traceback. Each works alone."""
    with pytest.raises(errors.ConfigError, match="train.compile=True with train.channels_last"):
        vmapped_run(Upsampled, [0, 1], batches_of(2, 1), optim.sgd(0.1), compile="aot_eager",
                    channels_last=True)
    vmapped_run(Upsampled, [0, 1], batches_of(2, 1), optim.sgd(0.1), channels_last=True)


# ---------------------------------------------------------------- batches


def test_member_batches_are_each_seeds_own():
    masks = [torch.randint(0, 3, (12, 12), generator=torch.Generator().manual_seed(i),
                           dtype=torch.uint8) for i in range(10)]
    dataset = palette_coded(masks)
    cfg = common.get_base_config().data
    cfg.crop_size, cfg.scale_range = (8, 8), (0.5, 1.5)  # random crops, scales and flips
    transform = augment.train_transform(cfg, dataset.info)
    together = batches.member_batches(dataset, transform, 3, [4, 5, 6], start_step=2)
    alone = [batches.train_batches(dataset, transform, 3, s, start_step=2) for s in (4, 5, 6)]
    for _ in range(4):  # across an epoch boundary (3 steps of 3 per epoch of 10)
        images, labels = next(together)
        assert images.shape == (3, 3, 3, 8, 8) and labels.shape == (3, 3, 8, 8)
        for k, stream in enumerate(alone):
            i, m = next(stream)
            assert torch.equal(images[k], i) and torch.equal(labels[k], m)


def test_benchmark_gives_the_rows_a_gpu_check_reads():
    """seg.seeds_bench.benchmark runs both sides of the comparison (not a timing test)."""
    from seg import seeds_bench

    cfg = unet.get_config()
    cfg.model.base_channels, cfg.model.depth = 4, 2
    rows = seeds_bench.benchmark(cfg, (2,), batch_size=2, crop=(16, 16), device="cpu",
                                 rounds=2, warmup=1)
    (row,) = rows
    assert (row["num_seeds"], row["batch_size"], row["crop"]) == (2, 2, [16, 16])
    assert row["vmap_s"] > 0 and row["sequential_s"] > 0 and row["speedup"] > 0
    assert row["vmap_images_per_s"] == pytest.approx(4 / row["vmap_s"])
    assert "| 2 | 2 |" in seeds_bench.markdown(rows)
