"""Train state and pure step functions.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, buffers, batch) -> metrics`
never mutate their inputs and never synchronise with the host: metrics come back as device
tensors that the caller accumulates and reads at log time.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from seg import amp, functional, losses, metrics, models, optim
from seg.functional import Buffers, Params
from seg.optim import Optimizer, Schedule

Batch = tuple[Tensor, Tensor]  # (images float (B,3,H,W), masks int64 (B,H,W))
# (grads, loss scalars) -> the same averaged over data-parallel ranks (seg.distributed)
GradReduce = Callable[[Params, dict], tuple[Params, dict]]


class TrainState(NamedTuple):
    step: Tensor        # 0-dim int64: a Python int would make torch.compile recompile every step
    params: Params      # all parameters, frozen ones included
    buffers: Buffers    # BatchNorm statistics
    opt_state: Any      # optimizer state over the trainable parameters only
    loss_scale: amp.LossScaleState | None = None   # fp16: the dynamic loss scale (seg/amp.py)


PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def init_state(params: Params, buffers: Buffers, optimizer: Optimizer, trainable: Iterable[str],
               *, channels_last: bool = False, loss_scale: amp.LossScale | None = None
               ) -> TrainState:
    """channels_last stores 4-D params (conv weights) in that memory format, and so the
    optimizer state made from them: a step built with channels_last=True then never mixes
    layouts in its element-wise updates. loss_scale: the initial dynamic loss scale of an fp16
    step (the same rule as the step's)."""
    if channels_last:
        params = functional.to_channels_last(params)
    device = next(iter(params.values())).device
    step = torch.zeros((), dtype=torch.int64, device=device)
    opt_state = optimizer.init({k: params[k] for k in trainable})
    scale = loss_scale.check().init(device) if loss_scale is not None else None
    return TrainState(step, params, buffers, opt_state, scale)


def make_train_step(model: nn.Module, loss_fn: Callable, optimizer: Optimizer, schedule: Schedule,
                    *, trainable: Iterable[str], frozen_modules: Iterable[str] = (),
                    aux_weight: float = 0.0, grad_impl: str = "auto",
                    compile: bool | str | Callable = False, donate: bool = False,
                    grad_reduce: GradReduce | None = None, skip_nonfinite: bool = False,
                    precision: str = "fp32", channels_last: bool = False,
                    checkpoint_activations: bool = False, clip_norm: float = 0.0,
                    loss_scale: amp.LossScale | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds the train step.

    grad_impl: "autograd" takes gradients with torch.autograd.grad over the functional call
    (params as fresh leaf tensors): within a few percent of an imperative loop in eager mode.
    "func" uses torch.func.grad_and_value, the form torch.compile traces as one graph (dynamo
    skips a frame that calls torch.autograd.grad). "auto" picks func when compiling, else
    autograd. Both compute the same numbers (tests/test_train.py).
    compile: torch.compile with fullgraph=True, so a graph break is an error, not a slowdown;
    a string names the backend (default inductor; tests use "aot_eager" to check graph capture),
    a callable is one (seg/gpu_check.py counts the graphs it is given).
    donate: the step may reuse the input state's storage for the output state (see
    `Optimizer`); for loops that never look at an old state again. Same numbers.
    grad_reduce: `(grads, losses) -> (grads, losses)` applied before the optimizer update, e.g.
    seg.distributed.make_grad_reduce's average over the data-parallel ranks; one with an
    `attach(leaves)` method (seg.distributed.BucketedGradReduce) is attached to the leaves
    before an autograd backward, to start its all-reduces while the backward runs (with
    grad_impl "func" its `flat` form is used: one all-reduce after the backward).
    skip_nonfinite: when the (reduced) loss is NaN or infinite, the step returns the input's
    params, buffers and optimizer state (selected with torch.where on a device flag: no host
    sync) and only the step counter advances. It needs the old state, so it turns `donate` off.
    Either way metrics["finite"] is that flag, for the caller to read when it syncs anyway.
    Metrics: "loss" (the objective), "loss_main" and, with an auxiliary head that counts,
    "loss_aux" (seg.losses.head_losses), "lr" (the step's learning rate), "finite" and
    "grad_norm": the 2-norm of all gradients (after averaging over ranks and unscaling, before
    clipping), as torch.nn.utils.clip_grad_norm_ computes it; fp16 adds "loss_scale" (the
    scale this step used) and "overflow" (its gradients overflowed: skipped).
    clip_norm > 0: gradients scaled by min(1, clip_norm / (grad_norm + 1e-6)), the arithmetic
    of clip_grad_norm_ (optimizer.clip_norm).
    precision: "bf16" runs the forward under bf16 autocast; params, gradients, optimizer state,
    the loss and the metrics stay float32 (the loss reads the logits cast back to float32).
    "fp16" does the same under float16 autocast, for GPUs without bf16 (V100, T4, RTX 20xx),
    with dynamic loss scaling (seg/amp.py; `loss_scale` is the rule, default GradScaler's; the
    state comes from `init_state(..., loss_scale=...)`): the loss is multiplied by the scale
    before the backward and the gradients divided by it; a step whose gradients overflow
    leaves params, BatchNorm statistics and optimizer state as they were (torch.where on a
    device flag, as skip_nonfinite) and backs the scale off. An imperative loop with GradScaler
    skips only the optimizer step and keeps the forward's BatchNorm update.
    channels_last: the images enter in channels_last memory format (pair it with
    `init_state(..., channels_last=True)` for the params).
    checkpoint_activations: the model's blocks (`models.CHECKPOINT_BLOCKS`) keep only their
    inputs and recompute their activations in the backward; needs grad_impl "autograd"
    (torch.func.grad refuses the saved-tensor hooks that checkpointing uses), so no compile.
    """
    trainable, trainable_set = tuple(trainable), frozenset(trainable)
    frozen_modules = tuple(frozen_modules)
    grad_impl = check_grad_impl(grad_impl, compile, checkpoint_activations)
    if compile and getattr(optimizer, "fused", False):
        raise ValueError("optimizer.fused=True runs torch's fused kernels, which torch.compile "
                         "cannot trace; with train.compile=True inductor fuses the update itself")
    if checkpoint_activations:
        model = functional.recompute_blocks(model, models.CHECKPOINT_BLOCKS)
    objective = make_objective(model, loss_fn, aux_weight=aux_weight, precision=precision,
                               channels_last=channels_last,
                               checkpoint_activations=checkpoint_activations)
    if grad_impl == "func" and hasattr(grad_reduce, "attach"):
        # torch.func has no hooks to start all-reduces from: one after the backward, as a pure
        # function that torch.compile traces (the overlapping object keeps per-step state)
        grad_reduce = grad_reduce.flat
    scaled = precision == "fp16"
    update = make_update(optimizer, schedule, donate=donate, grad_reduce=grad_reduce,
                         skip_nonfinite=skip_nonfinite, clip_norm=clip_norm,
                         loss_scale=(loss_scale or amp.LossScale()) if scaled else None)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        images, masks = batch
        fixed = {k: v for k, v in state.params.items() if k not in trainable_set}
        if scaled and state.loss_scale is None:
            raise ValueError("train.precision='fp16' needs a loss scale in the train state: "
                             "init_state(..., loss_scale=LossScale())")
        scale = state.loss_scale["scale"] if scaled else None

        def loss_of(train_params: Params):
            loss, (new_buffers, parts) = objective(train_params, fixed, state.buffers, images,
                                                   masks)
            scalars = {"loss": loss.detach(), **parts}
            return (loss * scale if scaled else loss), (new_buffers, scalars)

        train_params = {k: state.params[k] for k in trainable}
        if grad_impl == "func":
            grads, (_, (new_buffers, scalars)) = torch.func.grad_and_value(
                loss_of, has_aux=True)(train_params)
        else:
            leaves = {k: v.detach().requires_grad_(True) for k, v in train_params.items()}
            if hasattr(grad_reduce, "attach"):   # all-reduces overlapping the backward
                grad_reduce.attach(leaves)
            with torch.enable_grad():
                differentiated, (new_buffers, scalars) = loss_of(leaves)
                grads = dict(zip(leaves, torch.autograd.grad(differentiated,
                                                             list(leaves.values()))))
        return update(state, train_params, grads, scalars, new_buffers)

    core = _compiled(step, compile)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        functional.set_mode(model, train=True, frozen=frozen_modules)
        return core(state, batch)

    return train_step


def check_grad_impl(grad_impl: str, compile, checkpoint_activations: bool) -> str:
    """The gradient implementation make_train_step uses ("auto" resolved), or ValueError."""
    if grad_impl == "auto":
        grad_impl = "func" if compile else "autograd"
    if grad_impl not in ("autograd", "func"):
        raise ValueError(f"train.grad_impl={grad_impl!r} is not one of ('auto', 'autograd', "
                         "'func')")
    if compile and grad_impl == "autograd":
        raise ValueError("train.grad_impl='autograd' cannot be compiled as one graph; use "
                         "'func' or 'auto' with train.compile=True")
    if checkpoint_activations and grad_impl != "autograd":
        raise ValueError("train.checkpoint_activations=True needs train.grad_impl='autograd' "
                         "(torch.func.grad has no saved-tensor hooks), so train.compile=False")
    return grad_impl


def make_objective(model: nn.Module, loss_fn: Callable, *, aux_weight: float = 0.0,
                   precision: str = "fp32", channels_last: bool = False,
                   checkpoint_activations: bool = False) -> Callable:
    """objective(train_params, fixed_params, buffers, images, masks) -> (loss, (new buffers,
    the other loss scalars)): the train loss of one batch as a function of the trainable
    parameters. Everything it reads is an argument, so it can be differentiated
    (torch.func.grad) and mapped over stacked models (torch.func.vmap, seg/seeds.py).
    checkpoint_activations: `model` recomputes its blocks in the backward
    (functional.recompute_blocks); the forward's BatchNorm statistics are kept."""
    forward = _forward(model, precision, channels_last)

    def objective(train_params: Params, fixed: Params, buffers: Buffers, images: Tensor,
                  masks: Tensor):
        out, new_buffers = forward({**fixed, **train_params}, buffers, images)
        if checkpoint_activations:
            # The backward's recomputation runs BatchNorm again, which updates these
            # statistics a second time: keep the forward's values.
            new_buffers = {k: v.clone() for k, v in new_buffers.items()}
        parts = losses.head_losses(out, masks, loss_fn, aux_weight)
        loss = parts.pop("loss")
        return loss, (new_buffers, {k: v.detach() for k, v in parts.items()})

    return objective


def make_update(optimizer: Optimizer, schedule: Schedule, *, donate: bool = False,
                grad_reduce: GradReduce | None = None, skip_nonfinite: bool = False,
                clip_norm: float = 0.0, loss_scale: amp.LossScale | None = None,
                stacked: bool = False) -> Callable:
    """update(state, train_params, grads, scalars, new_buffers) -> (new state, metrics): the
    optimizer step and the step's metrics, after the gradients (see make_train_step for the
    options; loss_scale: the rule of an fp16 step, whose scale is in state.loss_scale).
    stacked: K models stacked along a first axis step at once (seg/seeds.py), their scalars of
    shape (K,): the update is element-wise, and the gradient norm and clipping are each
    member's own."""
    if clip_norm < 0:
        raise ValueError(f"optimizer.clip_norm={clip_norm!r} must be >= 0 (0: no clipping)")
    scaled = loss_scale is not None
    if scaled and stacked:
        raise ValueError("train.precision='fp16' with train.num_seeds > 1: each member would "
                         "need its own loss scale; use bf16 or fp32")
    loss_scale = loss_scale.check() if scaled else None
    skips = skip_nonfinite or scaled   # a skipped step needs the old state: no donation
    norm_of = _member_norms if stacked else optim.global_norm

    def update(state: TrainState, train_params: Params, grads: Params, scalars: dict,
               new_buffers: Buffers) -> tuple[TrainState, dict]:
        if grad_reduce is not None:
            grads, scalars = grad_reduce(grads, scalars)
        out_metrics = {**scalars, "lr": schedule(state.step)}
        names, g = list(grads), list(grads.values())
        apply = overflow = None   # where the step's update is kept (a device flag); None: always
        if scaled:
            scale = state.loss_scale["scale"]
            g = amp.unscale(g, scale)
            overflow = amp.overflowed(g)
            apply = ~overflow
            out_metrics.update(loss_scale=scale, overflow=overflow)
        norm = norm_of(g)
        if clip_norm:
            g = _clip(g, clip_norm, norm, stacked)
        grads = dict(zip(names, g))
        finite = torch.isfinite(scalars["loss"])
        if skip_nonfinite:
            apply = finite if apply is None else apply & finite
        new_params, opt_state = optimizer.update(grads, state.opt_state, train_params,
                                                 donate=donate and not skips)
        params = {k: new_params.get(k, v) for k, v in state.params.items()}
        if apply is not None:
            params, new_buffers, opt_state = tree_map(
                lambda new, old: torch.where(apply, new, old),
                (params, new_buffers, opt_state), (state.params, state.buffers, state.opt_state))
        new_scale = loss_scale.update(state.loss_scale, overflow) if scaled else state.loss_scale
        out_metrics.update(finite=finite, grad_norm=norm)
        return TrainState(state.step + 1, params, new_buffers, opt_state, new_scale), out_metrics

    return update


def _member_norms(grads: list[Tensor]) -> Tensor:
    """(K,) the 2-norm of each stacked member's gradients (first axis: the member)."""
    squares = [g.float().flatten(1).pow(2).sum(1) for g in grads]
    return torch.stack(squares).sum(0).sqrt()


def _clip(grads: list[Tensor], clip_norm: float, norm: Tensor, stacked: bool) -> list[Tensor]:
    if not stacked:
        return optim.clip_by_global_norm(grads, clip_norm, norm)
    factor = torch.clamp(clip_norm / (norm + 1e-6), max=1.0)   # clip_grad_norm_'s, per member
    return [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in grads]


def make_infer(model: nn.Module, *, logits_fn: Callable | None = None, precision: str = "fp32",
               channels_last: bool = False) -> Callable[[Params, Buffers, Tensor], Tensor]:
    """The one eval-mode forward: infer(params, buffers, images) -> float32 logits of the main
    head at the images' size, under no_grad. Evaluation, prediction pictures and inference on
    new images all run it, so they see the run's precision and memory format.

    logits_fn(forward, images) -> logits: how the main head is run over the images
    (seg.inference: sliding windows, test-time augmentation); default: one forward pass.
    precision and channels_last as in `make_train_step`. Eval mode is set by the caller
    (`functional.set_mode`), outside any compiled code.
    """
    forward = _forward(model, precision, channels_last)

    @torch.no_grad()
    def infer(params: Params, buffers: Buffers, images: Tensor) -> Tensor:
        def main_head(x: Tensor) -> Tensor:
            return forward(params, buffers, x)[0]["out"]

        return logits_fn(main_head, images) if logits_fn else main_head(images)

    return infer


class EvalStep:
    """eval_step(params, buffers, batch) -> totals of the batch: its confusion matrix and its
    loss sums (seg.losses.Loss.sums) over the main head. Totals add up over batches and ranks;
    `scores(totals)` gives the metrics and the loss of everything they were summed over, so
    neither depends on how the split was cut into batches.

    per_image: the output also holds "per_image", each image's (K, 3) counts
    (seg.metrics.per_image_counts), which `evaluate` collects instead of adding up."""

    def __init__(self, model: nn.Module, loss_fn, num_classes: int, *, ignore_index: int = 255,
                 compile: bool | str = False, logits_fn: Callable | None = None,
                 precision: str = "fp32", channels_last: bool = False, per_image: bool = False):
        self.model, self.loss_fn = model, loss_fn
        infer = make_infer(model, logits_fn=logits_fn, precision=precision,
                           channels_last=channels_last)

        def step(params: Params, buffers: Buffers, batch: Batch) -> dict:
            images, masks = batch[:2]
            logits = infer(params, buffers, images)
            labels = metrics.predict(logits)
            cm = metrics.confusion_matrix(labels, masks, num_classes, ignore_index)
            # float64 from here on: the sums of many batches lose nothing to rounding
            sums = {k: v.to(torch.float64) for k, v in loss_fn.sums(logits, masks).items()}
            out = {"confusion": cm, "loss": sums}
            if per_image:
                out["per_image"] = metrics.per_image_counts(labels, masks, num_classes,
                                                            ignore_index)
            return out

        self._step = _compiled(step, compile)

    def __call__(self, params: Params, buffers: Buffers, batch: Batch) -> dict:
        functional.set_mode(self.model, train=False)
        return self._step(params, buffers, batch[:2])

    def scores(self, totals: dict) -> dict:
        """The metrics of seg.metrics.scores, "loss" and "confusion_matrix", as Python values."""
        confusion = totals["confusion"].cpu()
        result = metrics.scores(confusion)
        result["loss"] = float(self.loss_fn.reduce(totals["loss"]))
        result["confusion_matrix"] = confusion.tolist()
        return result


def make_eval_step(model: nn.Module, loss_fn, num_classes: int, **options) -> EvalStep:
    """The eval step of `model` (options: ignore_index, compile, logits_fn, precision,
    channels_last; see EvalStep and make_infer)."""
    return EvalStep(model, loss_fn, num_classes, **options)


def _forward(model: nn.Module, precision: str, channels_last: bool) -> Callable:
    """(params, buffers, images) -> (float32 outputs, new buffers) at the given precision and
    memory format. Autocast covers the model only: losses and metrics see float32 logits."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is not one of {PRECISIONS}")

    def forward(params: Params, buffers: Buffers, images: Tensor) -> tuple[dict, Buffers]:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(images.device.type, dtype=_AUTOCAST[precision])
              if precision in _AUTOCAST
              else contextlib.nullcontext()):  # fp32 leaves a caller's own autocast alone
            out, new_buffers = functional.apply(model, params, buffers, images)
        # at least float32 (autocast outputs are cast up; float64 stays float64)
        return {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in out.items()}, \
            new_buffers

    return forward


def _compiled(fn: Callable, compile: bool | str | Callable) -> Callable:
    if not compile:
        return fn
    return torch.compile(fn, fullgraph=True, backend="inductor" if compile is True else compile)


def evaluate(eval_step: EvalStep, params: Params, buffers: Buffers, batches: Iterable[tuple],
             reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
             gather: Callable[[object], list] | None = None) -> dict:
    """Runs a whole split; accumulates on the device and reads the host once at the end.

    reduce: sums the totals over the ranks that each ran a shard of the split (e.g.
    seg.distributed.sum_across), so the metrics are those of the whole split.
    Per-image results: when the eval step makes them and the batches carry the dataset indices
    of their samples (seg.data.batches.eval_batches(..., indices=True)), the result holds
    "per_image": {"index": (N,), "counts": (N, K, 3)} on the CPU, sorted by index; gather
    (e.g. seg.distributed.gather_objects) collects the ranks' shares.
    """
    total, rows, index = None, [], []
    for batch in batches:
        out = eval_step(params, buffers, batch)
        if "per_image" in out:
            rows.append(out.pop("per_image"))
            index.append(batch[2] if len(batch) > 2 else None)
        total = out if total is None else tree_map(torch.add, total, out)
    if total is None:
        raise ValueError("evaluate() got no batches: the split is empty")
    if reduce is not None:
        leaves, spec = tree_flatten(total)
        total = tree_unflatten(reduce(leaves), spec)
    result = eval_step.scores(total)
    if rows and all(i is not None for i in index):
        result["per_image"] = _per_image(torch.cat(rows).cpu(), torch.cat(index), gather)
    return result


def _per_image(counts: Tensor, index: Tensor, gather) -> dict:
    if gather is not None:
        shares = gather((index, counts))
        index, counts = torch.cat([i for i, _ in shares]), torch.cat([c for _, c in shares])
    order = index.argsort()
    return {"index": index[order], "counts": counts[order]}
