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

from seg import functional, losses, metrics, models
from seg.functional import Buffers, Params
from seg.optim import Optimizer, Schedule

Batch = tuple[Tensor, Tensor]  # (images float (B,3,H,W), masks int64 (B,H,W))
GradReduce = Callable[[Params, Tensor], tuple[Params, Tensor]]


class TrainState(NamedTuple):
    step: Tensor        # 0-dim int64: a Python int would make torch.compile recompile every step
    params: Params      # all parameters, frozen ones included
    buffers: Buffers    # BatchNorm statistics
    opt_state: Any      # optimizer state over the trainable parameters only


PRECISIONS = ("fp32", "bf16")


def init_state(params: Params, buffers: Buffers, optimizer: Optimizer, trainable: Iterable[str],
               *, channels_last: bool = False) -> TrainState:
    """channels_last stores 4-D params (conv weights) in that memory format, and so the
    optimizer state made from them: a step built with channels_last=True then never mixes
    layouts in its element-wise updates."""
    if channels_last:
        params = functional.to_channels_last(params)
    step = torch.zeros((), dtype=torch.int64, device=next(iter(params.values())).device)
    opt_state = optimizer.init({k: params[k] for k in trainable})
    return TrainState(step, params, buffers, opt_state)


def make_train_step(model: nn.Module, loss_fn: Callable, optimizer: Optimizer, schedule: Schedule,
                    *, trainable: Iterable[str], frozen_modules: Iterable[str] = (),
                    aux_weight: float = 0.0, grad_impl: str = "auto",
                    compile: bool | str = False, donate: bool = False,
                    grad_reduce: GradReduce | None = None, skip_nonfinite: bool = False,
                    precision: str = "fp32", channels_last: bool = False,
                    checkpoint_activations: bool = False
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds the train step.

    grad_impl: "autograd" takes gradients with torch.autograd.grad over the functional call
    (params as fresh leaf tensors): within a few percent of an imperative loop in eager mode.
    "func" uses torch.func.grad_and_value, the form torch.compile traces as one graph (dynamo
    skips a frame that calls torch.autograd.grad). "auto" picks func when compiling, else
    autograd. Both compute the same numbers (tests/test_train.py).
    compile: torch.compile with fullgraph=True, so a graph break is an error, not a slowdown;
    a string names the backend (default inductor; tests use "aot_eager" to check graph capture).
    donate: the step may reuse the input state's storage for the output state (see
    `Optimizer`); for loops that never look at an old state again. Same numbers.
    grad_reduce: `(grads, loss) -> (grads, loss)` applied before the optimizer update, e.g.
    seg.distributed.make_grad_reduce's average over the data-parallel ranks.
    skip_nonfinite: when the (reduced) loss is NaN or infinite, the step returns the input's
    params, buffers and optimizer state (selected with torch.where on a device flag: no host
    sync) and only the step counter advances. It needs the old state, so it turns `donate` off.
    Either way metrics["finite"] is that flag, for the caller to read when it syncs anyway.
    precision: "bf16" runs the forward under bf16 autocast; params, gradients, optimizer state,
    the loss and the metrics stay float32 (the loss reads the logits cast back to float32).
    channels_last: the images enter in channels_last memory format (pair it with
    `init_state(..., channels_last=True)` for the params).
    checkpoint_activations: the model's blocks (`models.CHECKPOINT_BLOCKS`) keep only their
    inputs and recompute their activations in the backward; needs grad_impl "autograd"
    (torch.func.grad refuses the saved-tensor hooks that checkpointing uses), so no compile.
    """
    trainable, trainable_set = tuple(trainable), frozenset(trainable)
    frozen_modules = tuple(frozen_modules)
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
    if checkpoint_activations:
        model = functional.recompute_blocks(model, models.CHECKPOINT_BLOCKS)
    forward = _forward(model, precision, channels_last)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        images, masks = batch
        fixed = {k: v for k, v in state.params.items() if k not in trainable_set}

        def loss_of(train_params: Params):
            out, new_buffers = forward({**fixed, **train_params}, state.buffers, images)
            if checkpoint_activations:
                # The backward's recomputation runs BatchNorm again, which updates these
                # statistics a second time: keep the forward's values.
                new_buffers = {k: v.clone() for k, v in new_buffers.items()}
            return losses.total_loss(out, masks, loss_fn, aux_weight), new_buffers

        train_params = {k: state.params[k] for k in trainable}
        if grad_impl == "func":
            grads, (loss, new_buffers) = torch.func.grad_and_value(loss_of, has_aux=True)(
                train_params)
        else:
            leaves = {k: v.detach().requires_grad_(True) for k, v in train_params.items()}
            with torch.enable_grad():
                loss, new_buffers = loss_of(leaves)
                grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
            loss = loss.detach()
        if grad_reduce is not None:
            grads, loss = grad_reduce(grads, loss)
        finite = torch.isfinite(loss)
        new_params, opt_state = optimizer.update(grads, state.opt_state, train_params,
                                                 donate=donate and not skip_nonfinite)
        params = {k: new_params.get(k, v) for k, v in state.params.items()}
        if skip_nonfinite:
            params, new_buffers, opt_state = _select(
                finite, (params, new_buffers, opt_state),
                (state.params, state.buffers, state.opt_state))
        out_metrics = {"loss": loss, "lr": schedule(state.step), "finite": finite}
        return TrainState(state.step + 1, params, new_buffers, opt_state), out_metrics

    core = _compiled(step, compile)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        functional.set_mode(model, train=True, frozen=frozen_modules)
        return core(state, batch)

    return train_step


def _select(flag: Tensor, new: Any, old: Any) -> Any:
    """torch.where(flag, new, old) over matching trees of dicts / tuples of tensors."""
    if isinstance(new, dict):
        return {k: _select(flag, v, old[k]) for k, v in new.items()}
    if isinstance(new, (tuple, list)):
        return type(new)(_select(flag, a, b) for a, b in zip(new, old))
    return torch.where(flag, new, old)


def make_eval_step(model: nn.Module, loss_fn: Callable, num_classes: int, *,
                   ignore_index: int = 255, compile: bool | str = False,
                   logits_fn: Callable | None = None, precision: str = "fp32",
                   channels_last: bool = False) -> Callable[[Params, Buffers, Batch], dict]:
    """Eval step: the batch's confusion matrix, and its main-head loss times its image count
    (summed over a split and divided by the split's image count: the split's mean loss).

    logits_fn(forward, images) -> logits: how the main head is run over the images
    (seg.inference: sliding windows, test-time augmentation); default: one forward pass.
    precision and channels_last as in `make_train_step`; predictions come from float32 logits.
    """
    forward = _forward(model, precision, channels_last)

    @torch.no_grad()
    def step(params: Params, buffers: Buffers, batch: Batch) -> dict:
        images, masks = batch
        def main_head(x: Tensor) -> Tensor:
            return forward(params, buffers, x)[0]["out"]

        logits = logits_fn(main_head, images) if logits_fn else main_head(images)
        cm = metrics.confusion_matrix(metrics.predict(logits), masks, num_classes, ignore_index)
        return {"confusion": cm, "loss_sum": loss_fn(logits, masks).float() * images.shape[0]}

    core = _compiled(step, compile)

    def eval_step(params: Params, buffers: Buffers, batch: Batch) -> dict:
        functional.set_mode(model, train=False)
        return core(params, buffers, batch)

    return eval_step


def _forward(model: nn.Module, precision: str, channels_last: bool) -> Callable:
    """(params, buffers, images) -> (float32 outputs, new buffers) at the given precision and
    memory format. Autocast covers the model only: losses and metrics see float32 logits."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is not one of {PRECISIONS}")

    def forward(params: Params, buffers: Buffers, images: Tensor) -> tuple[dict, Buffers]:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(images.device.type, dtype=torch.bfloat16) if precision == "bf16"
              else contextlib.nullcontext()):  # fp32 leaves a caller's own autocast alone
            out, new_buffers = functional.apply(model, params, buffers, images)
        return {k: v.float() for k, v in out.items()}, new_buffers

    return forward


def _compiled(fn: Callable, compile: bool | str) -> Callable:
    if not compile:
        return fn
    return torch.compile(fn, fullgraph=True,
                         backend=compile if isinstance(compile, str) else "inductor")


def evaluate(eval_step: Callable, params: Params, buffers: Buffers, batches: Iterable[Batch],
             reduce: Callable[[list[Tensor]], list[Tensor]] | None = None) -> dict:
    """Runs a whole split; accumulates on device and reads the host once at the end.

    reduce: sums the totals over the ranks that each ran a shard of the split (e.g.
    seg.distributed.sum_across), so the metrics are those of the whole split.
    """
    total, images = None, 0
    for batch in batches:
        out = eval_step(params, buffers, batch)
        total = out if total is None else {k: total[k] + v for k, v in out.items()}
        images += batch[0].shape[0]  # known on the host: no device counter needed
    if total is None:
        raise ValueError("evaluate() got no batches: the split is empty")
    confusion, loss_sum = total["confusion"], total["loss_sum"]
    if reduce is not None:
        count = torch.tensor(images, dtype=torch.int64, device=confusion.device)
        confusion, loss_sum, count = reduce([confusion, loss_sum, count])
        images = int(count)
    result = metrics.scores(confusion.cpu())
    result["loss"] = loss_sum.item() / images
    result["confusion_matrix"] = confusion.cpu().tolist()
    return result
