from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg import losses

IGN = 255
WEIGHTS = torch.tensor([0.2, 1.0, 3.0, 0.5])


def multiclass_batch(seed, shape=(2, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    logits = torch.randn(shape, generator=g) * 2
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < 0.3] = IGN
    return logits, target


def binary_batch(seed, shape=(2, 1, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    target = torch.randint(0, 2, (shape[0], *shape[2:]), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.3] = IGN
    return logits, target


# name -> (loss_fn, batch maker); every loss must pass the ignore / empty-batch contract.
ALL_LOSSES = {
    "cross_entropy": (losses.cross_entropy, multiclass_batch),
    "cross_entropy_weighted": (
        lambda x, t: losses.cross_entropy(x, t, weight=WEIGHTS), multiclass_batch),
    "focal": (losses.focal_loss, multiclass_batch),
    "focal_gamma_half_weighted": (
        lambda x, t: losses.focal_loss(x, t, gamma=0.5, weight=WEIGHTS), multiclass_batch),
    "bce": (losses.bce_with_logits, binary_batch),
    "bce_soft_iou": (losses.bce_soft_iou, binary_batch),
    "dice": (losses.dice_loss, multiclass_batch),
    "dice_binary": (losses.dice_loss, binary_batch),
}


@pytest.mark.parametrize("weight", [None, WEIGHTS])
def test_cross_entropy_matches_torch(weight):
    logits, target = multiclass_batch(0)
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGN)
    actual = losses.cross_entropy(logits, target, weight=weight)
    assert actual.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("weight", [None, WEIGHTS])
def test_focal_gamma_zero_is_cross_entropy(weight):
    logits, target = multiclass_batch(1)
    focal = losses.focal_loss(logits, target, gamma=0.0, weight=weight)
    assert torch.equal(focal, losses.cross_entropy(logits, target, weight=weight))


def test_focal_by_hand():
    # Two pixels count, the third is ignored. Logits per pixel over 3 classes.
    per_pixel = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [9.0, -9.0, 3.0]]
    logits = torch.tensor(per_pixel).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[[0, 2, IGN]]])
    p0 = math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))
    p1 = math.exp(0.0) / (math.exp(0.5) + math.exp(1.5) + math.exp(0.0))
    fl = [(1 - p) ** 2 * -math.log(p) for p in (p0, p1)]
    actual = losses.focal_loss(logits, target, gamma=2.0)
    assert actual.item() == pytest.approx(sum(fl) / 2, rel=1e-6)
    w = [0.5, 1.0, 4.0]  # weighted mean: pixel weights are w[0] and w[2]
    weighted = (w[0] * fl[0] + w[2] * fl[1]) / (w[0] + w[2])
    actual = losses.focal_loss(logits, target, gamma=2.0, weight=torch.tensor(w))
    assert actual.item() == pytest.approx(weighted, rel=1e-6)


def test_bce_matches_torch_on_valid_pixels():
    logits, target = binary_batch(2)
    valid = target != IGN
    expected = F.binary_cross_entropy_with_logits(logits[:, 0][valid], target[valid].float())
    assert losses.bce_with_logits(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_bce_soft_iou_by_hand():
    logits = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    target = torch.tensor([[[1, 0], [1, IGN]]])
    x, y = np.array([1.0, -2.0, 0.5]), np.array([1.0, 0.0, 1.0])  # the valid pixels
    p = 1 / (1 + np.exp(-x))
    bce = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    iou = (np.sum(p * y) + 1e-7) / (np.sum(p + y - p * y) + 1e-7)
    assert losses.bce_soft_iou(logits, target).item() == pytest.approx(bce + 1 - iou, rel=1e-6)


def test_dice_by_hand():
    logits, target = multiclass_batch(3, shape=(2, 3, 3, 4))
    p = torch.softmax(logits.double(), 1).numpy()
    t = target.numpy()
    dices = []
    for c in range(3):
        valid = t != IGN
        pc, yc = p[:, c][valid], (t[valid] == c).astype(float)
        dices.append((2 * np.sum(pc * yc) + 1.0) / (np.sum(pc) + np.sum(yc) + 1.0))
    assert losses.dice_loss(logits, target).item() == pytest.approx(1 - np.mean(dices), rel=1e-6)


def test_dice_binary_uses_sigmoid_foreground():
    logits = torch.tensor([[[[0.0, 2.0, -1.0]]]])
    target = torch.tensor([[[1, 0, IGN]]])
    p = [0.5, 1 / (1 + math.exp(-2.0))]
    dice = (2 * (p[0] * 1 + p[1] * 0) + 0.5) / (p[0] + p[1] + 1 + 0.5)
    assert losses.dice_loss(logits, target, eps=0.5).item() == pytest.approx(1 - dice, rel=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_ignored_pixels_have_zero_loss_and_zero_gradient(name):
    fn, make = ALL_LOSSES[name]
    logits, target = make(4)
    ignored = (target == IGN).unsqueeze(1).expand_as(logits)
    x = logits.clone().requires_grad_(True)
    loss = fn(x, target)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    changed = torch.where(ignored, torch.randn_like(logits) * 50, logits)
    assert torch.equal(fn(changed, target), loss.detach())


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_all_ignored_batch_is_zero_with_zero_gradient(name):
    fn, make = ALL_LOSSES[name]
    logits, target = make(5)
    # Huge logits push p_t to exactly 1 in float32: the (1-p)^gamma NaN trap for gamma < 1.
    x = (logits * 100).requires_grad_(True)
    loss = fn(x, torch.full_like(target, IGN))
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_focal_gradient_finite_at_certain_pixels():
    logits = torch.tensor([[[[60.0, 0.0]], [[-60.0, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])  # first pixel has p_t == 1.0 in float32
    for gamma in (0.0, 0.25, 0.5, 2.0):
        (grad,) = torch.autograd.grad(losses.focal_loss(logits, target, gamma=gamma), logits)
        assert torch.isfinite(grad).all(), gamma
        assert grad[0, :, 0, 0].abs().max() < 1e-12, gamma


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bfloat16_logits_are_computed_in_float32(name):
    fn, make = ALL_LOSSES[name]
    logits, target = make(6)
    low = logits.bfloat16()
    loss = fn(low, target)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, fn(low.float(), target))


def test_total_loss_adds_weighted_aux():
    out, target = multiclass_batch(7)
    aux, _ = multiclass_batch(8)
    main = losses.cross_entropy(out, target)
    with_aux = losses.total_loss({"out": out, "aux": aux}, target, losses.cross_entropy, 0.4)
    assert torch.equal(with_aux, main + 0.4 * losses.cross_entropy(aux, target))
    assert torch.equal(losses.total_loss({"out": out}, target, losses.cross_entropy, 0.4), main)
    zero_weight = losses.total_loss({"out": out, "aux": aux}, target, losses.cross_entropy, 0.0)
    assert torch.equal(zero_weight, main)
    with pytest.raises(ValueError, match="out"):
        losses.total_loss({"aux": aux}, target, losses.cross_entropy, 0.4)


def loss_config(name, gamma=2.0, class_weights=()):
    return ml_collections.ConfigDict(
        {"name": name, "gamma": gamma, "class_weights": class_weights, "ignore_index": IGN}
    )


@pytest.mark.parametrize(
    "name,reference,binary",
    [
        ("cross_entropy", losses.cross_entropy, False),
        ("focal", lambda x, t: losses.focal_loss(x, t, gamma=0.5), False),
        ("dice", losses.dice_loss, False),
        ("bce", losses.bce_with_logits, True),
        ("bce_soft_iou", losses.bce_soft_iou, True),
    ],
)
def test_build_returns_the_named_loss(name, reference, binary):
    assert (name in losses.BINARY_LOSSES) == binary
    fn = losses.build(loss_config(name, gamma=0.5), num_classes=2 if binary else 4)
    logits, target = (binary_batch if binary else multiclass_batch)(9)
    assert torch.equal(fn(logits, target), reference(logits, target))


def test_build_class_weights_and_ignore_index():
    logits, target = multiclass_batch(10)
    target = torch.where(target == IGN, 0, target)  # ignore class 0 instead of 255
    cfg = loss_config("cross_entropy", class_weights=tuple(WEIGHTS.tolist()))
    cfg.ignore_index = 0
    expected = F.cross_entropy(logits, target, weight=WEIGHTS, ignore_index=0)
    assert losses.build(cfg, 4)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize(
    "cfg,num_classes,match",
    [
        (loss_config("lovasz"), 4, "loss.name"),
        (loss_config("cross_entropy", class_weights=(1.0, 2.0)), 4, "class_weights"),
        (loss_config("dice", class_weights=(1.0, 2.0)), 2, "class_weights"),
        (loss_config("bce"), 3, "num_classes"),
    ],
)
def test_build_rejects_bad_config(cfg, num_classes, match):
    with pytest.raises(ValueError, match=match):
        losses.build(cfg, num_classes)


def test_bad_inputs_raise_value_error():
    logits, target = multiclass_batch(11)
    with pytest.raises(ValueError, match="target must have shape"):
        losses.cross_entropy(logits, target[:, :-1])
    with pytest.raises(ValueError, match="2 logit channels"):
        losses.cross_entropy(logits[:, :1], target)
    with pytest.raises(ValueError, match=r"\(B, 1"):
        losses.bce_with_logits(logits, target)
    with pytest.raises(ValueError, match="weight"):
        losses.cross_entropy(logits, target, weight=torch.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        losses.focal_loss(logits, target, gamma=-1.0)
    with pytest.raises(ValueError, match="eps"):
        losses.dice_loss(logits, target, eps=0.0)


@pytest.mark.parametrize(
    "name", ["cross_entropy_weighted", "focal_gamma_half_weighted", "bce_soft_iou", "dice"])
def test_losses_trace_as_one_graph(name):
    fn, make = ALL_LOSSES[name]
    logits, target = make(12)
    # fullgraph=True fails on any graph break, which a host sync (.item(), x[mask]) would cause.
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.equal(compiled(logits, target), fn(logits, target))


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_sums_over_batches_reduce_to_the_loss_of_the_whole(name):
    """An evaluation adds the sums of its batches: the result must be the loss of all of them
    taken as one batch (in float64 the two differ by rounding only)."""
    fn, make = ALL_LOSSES[name]
    loss = fn if isinstance(fn, losses.Loss) else None
    if loss is None:  # the weighted variants are lambdas over a Loss with bound options
        base = losses.cross_entropy if "cross" in name else losses.focal_loss
        loss = base.bind(weight=WEIGHTS.double(), **({"gamma": 0.5} if "half" in name else {}))
    parts = [make(seed) for seed in (20, 21, 22)]
    parts = [(x.double(), t) for x, t in parts]
    total = None
    for x, t in parts:
        s = loss.sums(x, t)
        total = s if total is None else {k: total[k] + v for k, v in s.items()}
    whole = loss(torch.cat([x for x, _ in parts]), torch.cat([t for _, t in parts]))
    assert loss.reduce(total).item() == pytest.approx(whole.item(), rel=1e-12)
    assert loss(*parts[0]).item() == pytest.approx(loss.reduce(loss.sums(*parts[0])).item(),
                                                   rel=0)


def test_head_losses_split_the_objective():
    logits, target = multiclass_batch(30)
    aux = logits.flip(1)
    parts = losses.head_losses({"out": logits, "aux": aux}, target, losses.cross_entropy, 0.4)
    assert torch.equal(parts["loss_main"], losses.cross_entropy(logits, target))
    assert torch.equal(parts["loss_aux"], losses.cross_entropy(aux, target))
    assert torch.equal(parts["loss"], parts["loss_main"] + 0.4 * parts["loss_aux"])
    assert set(losses.head_losses({"out": logits, "aux": aux}, target, losses.cross_entropy,
                                  0.0)) == {"loss", "loss_main"}
