"""K models in one train step (train.num_seeds=K): the seeds seed, seed+1, ..., seed+K-1 of a
config trained by ONE step mapped with torch.func.vmap over their stacked params, BatchNorm
buffers and optimizer state. Models here are definitions and the state is explicit dicts, so
stacking the dicts and mapping the pure step is all it takes (as JAX code vmaps over params).

Each member k sees what a separate run with seed + k sees, so that it *is* that run up to
float rounding:
  - its own batches, in its own order and augmentation (seg.data.batches.member_batches:
    (K, B, ...) per step);
  - its own dropout masks: torch.func.vmap would draw one set from the one global generator
    (randomness="different"), so the dropout modules are replaced by `MaskedDropout`, whose
    noise is an input (a buffer passed through functional_call), drawn outside the mapped
    function from member k's own generator state with the operations F.dropout performs
    (`SeedRng`; the states are saved in each member's checkpoint, as DropoutRng's are);
  - the optimizer's arithmetic: the update is element-wise, so it runs on the stacked tensors
    as they are (no vmap: torch's _foreach kernels have no batching rule) and gives each
    member's numbers bitwise. The step and optimizer counters are shared (members step
    together), which is why train.nonfinite='skip' (a member skipping alone) is refused.
What differs is the rounding of the batched kernels: under vmap a convolution over K models is
one grouped convolution, whose sums are ordered differently from K separate ones.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seg import functional
from seg import train as steps
from seg.errors import ConfigError

# The dropout modules whose masks can be drawn per member, and whether they drop whole
# feature maps (F.dropout2d on a 4-D input is aten::feature_dropout) or single elements.
_DROPOUTS = {nn.Dropout: False, nn.Dropout2d: True}


# ---------------------------------------------------------------- stacking


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """(K, *shape): the members' tensors along a new first axis, each member's slice in its
    tensor's memory format (channels_last conv weights stay channels_last per member)."""
    t = tensors[0]
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        n, c, h, w = t.shape
        out = torch.empty((len(tensors), n, h, w, c), dtype=t.dtype,
                          device=t.device).permute(0, 1, 4, 2, 3)
        for k, member in enumerate(tensors):
            out[k].copy_(member)
        return out
    return torch.stack(list(tensors))


def stack_states(states: Sequence[steps.TrainState]) -> steps.TrainState:
    """One TrainState holding K members: params, buffers and the per-parameter optimizer state
    stacked along a first axis; the step and the optimizer's counters (0-dim tensors outside
    the per-parameter dicts) shared, which requires them equal."""
    first = states[0]
    names = set(first.params)

    def shared(values: list[Tensor], what: str) -> Tensor:
        if any(not torch.equal(v, values[0]) for v in values[1:]):
            raise ValueError(f"the members' {what} differ ({[v.tolist() for v in values]}): "
                             "they must have taken the same number of steps")
        return values[0]

    def opt_tree(trees: list, path: str):
        if isinstance(trees[0], dict):
            keys = set(trees[0])
            if keys and keys <= names:  # a per-parameter dict (momentum, Adam's moments)
                return {k: stack([t[k] for t in trees]) for k in trees[0]}
            return {k: opt_tree([t[k] for t in trees], f"{path}.{k}") for k in trees[0]}
        return shared(trees, f"optimizer state {path}")

    return steps.TrainState(
        shared([s.step for s in states], "steps"),
        {k: stack([s.params[k] for s in states]) for k in first.params},
        {k: stack([s.buffers[k] for s in states]) for k in first.buffers},
        opt_tree([s.opt_state for s in states], "opt_state"))


def member_state(state: steps.TrainState, k: int) -> steps.TrainState:
    """Member k's TrainState, a separate run's, as copies: a slice would share (and
    torch.save would write) the storage of all K members."""
    names = set(state.params)

    def opt_tree(tree):
        if isinstance(tree, dict):
            if tree and set(tree) <= names:
                return {n: v[k].clone() for n, v in tree.items()}
            return {n: opt_tree(v) for n, v in tree.items()}
        return tree.clone()

    return steps.TrainState(state.step.clone(), {n: v[k].clone() for n, v in state.params.items()},
                            {n: v[k].clone() for n, v in state.buffers.items()},
                            opt_tree(state.opt_state))


def member_metrics(metrics: dict, k: int) -> dict:
    """Member k's train metrics from the stacked step's (the shared learning rate as it is)."""
    return {key: v[k] if v.dim() else v for key, v in metrics.items()}


# ---------------------------------------------------------------- dropout per member


class DropoutCall(NamedTuple):
    """One dropout draw of a forward pass, as a separate run makes it."""
    path: str                 # the module's path in the model
    index: int                # its how-manieth call of that module in the forward
    shape: tuple[int, ...]    # the input's
    stride: tuple[int, ...]   # the input's (element noise is empty_like(input): its layout)
    dtype: torch.dtype        # the input's (bf16 under autocast)
    p: float
    feature: bool             # whole feature maps (Dropout2d) or single elements

    @property
    def key(self) -> str:
        return f"{self.path}.mask{self.index}"


def probe_dropout(model: nn.Module, run: Callable[[], object], device: torch.device
                  ) -> list[DropoutCall]:
    """The dropout draws, in their order, of one train-mode forward of `model` (already in its
    train/frozen modes) made by `run()` (e.g. seg.train's objective of one member: the run's
    precision and memory format; BatchNorm on copies of the buffers), called once without
    gradients and its draws undone (fork_rng). Raises ValueError for a dropout this module
    cannot draw per member."""
    calls, seen = [], {}

    def hook(path):
        def record(module, args):
            x = args[0]
            if not module.training or module.p == 0 or x.numel() == 0:
                return  # F.dropout returns its input untouched: no draw
            feature = _DROPOUTS[type(module)]
            if feature and x.dim() != 4:
                raise ValueError(f"train.num_seeds > 1: {path} (Dropout2d) got a "
                                 f"{x.dim()}-D input; per-member masks need 4-D")
            index = seen[path] = seen.get(path, -1) + 1
            calls.append(DropoutCall(path, index, tuple(x.shape), tuple(x.stride()), x.dtype,
                                     module.p, feature))
        return record

    handles = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if type(module) not in _DROPOUTS:
                raise ValueError(f"train.num_seeds > 1 draws each member's dropout masks for "
                                 f"nn.Dropout and nn.Dropout2d only; {path} is "
                                 f"{type(module).__name__}")
            handles.append(module.register_forward_pre_hook(hook(path)))
    try:
        with torch.no_grad(), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else []):
            run()
    finally:
        for h in handles:
            h.remove()
    for path, n in seen.items():
        shapes = [c.shape for c in calls if c.path == path]
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"train.num_seeds > 1: {path} drops out {n + 1} inputs of one "
                             f"shape in a forward pass; its per-member masks are told apart "
                             "by shape")
    return calls


class MaskedDropout(nn.Module):
    """Dropout whose noise is given: buffers mask<i>, the scaled Bernoulli noise of the i-th
    call (told apart by the input's shape), multiplied in as F.dropout multiplies its own
    (aten's _dropout_impl: input.mul(noise)). Eval mode: the identity, as F.dropout."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        for i in range(len(self.shapes)):
            self.register_buffer(f"mask{i}", torch.empty(0, device="meta"), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        for i, shape in enumerate(self.shapes):
            if tuple(x.shape) == shape:
                return x * getattr(self, f"mask{i}")
        raise RuntimeError(f"MaskedDropout: no mask for an input of shape {tuple(x.shape)}")


def mapped_copy(model: nn.Module, calls: Sequence[DropoutCall]) -> nn.Module:
    """The copy of the definition that runs under vmap: its dropout modules that draw take
    their noise as buffers named DropoutCall.key (the others stay: in eval mode they draw
    nothing), and its convolutions and BatchNorm layers do under autocast what they do in a
    separate run (`_autocast_conv`, `_mixed_batch_norm`)."""
    model = copy.deepcopy(model)
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            module.forward = _autocast_conv(module, path)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = _mixed_batch_norm(module, path)
    shapes: dict[str, list] = {}
    for c in calls:
        shapes.setdefault(c.path, []).append(c.shape)
    for path, module_shapes in shapes.items():
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, name, MaskedDropout(module_shapes))
    return model


def _autocast_conv(conv: nn.Module, path: str) -> Callable:
    """conv's forward, casting its input, weight and bias to the autocast dtype itself when
    autocast is on, as autocast would: autocast does not reach a convolution under
    torch.func.vmap, which then stays float32 (torch 2.14; the other ops of autocast's lists,
    matmuls included, are cast). Outside autocast: the plain forward."""
    cls = type(conv)
    if cls.forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                           nn.ConvTranspose2d.forward):
        raise ValueError(f"train.num_seeds > 1: {path} is a {cls.__name__}, whose forward "
                         "cannot be cast for autocast under vmap")
    plain = cls.forward

    def forward(x: Tensor, *rest) -> Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return plain(conv, x, *rest)
        dtype = torch.get_autocast_dtype(device)
        w = conv.weight.to(dtype)
        b = None if conv.bias is None else conv.bias.to(dtype)
        with torch.autocast(device, enabled=False):
            if isinstance(conv, nn.ConvTranspose2d):
                if rest:
                    raise ValueError(f"train.num_seeds > 1: {path} is given an output size")
                return F.conv_transpose2d(x.to(dtype), w, b, conv.stride, conv.padding,
                                          conv.output_padding, conv.groups, conv.dilation)
            return conv._conv_forward(x.to(dtype), w, b)

    return forward


def _mixed_batch_norm(norm: nn.Module, path: str) -> Callable:
    """norm's forward for a reduced-precision input with float32 parameters and statistics
    (bf16 autocast leaves BatchNorm alone): computed in float32 and rounded to the input's
    dtype once, as torch's mixed-type BatchNorm kernels do; vmap's BatchNorm rule refuses the
    mixed types (torch 2.14)."""
    plain = type(norm).forward
    if plain is not nn.modules.batchnorm._BatchNorm.forward:
        raise ValueError(f"train.num_seeds > 1: {path} is a {type(norm).__name__}, which "
                         "cannot run under vmap here")

    def forward(x: Tensor) -> Tensor:
        if norm.weight is None or x.dtype == norm.weight.dtype:
            return plain(norm, x)
        return plain(norm, x.float()).to(x.dtype)

    return forward


def _noise(call: DropoutCall, device: torch.device) -> Tensor:
    """The scaled noise F.dropout multiplies its input by, drawn from the global generator as
    F.dropout draws it. CPU (aten's _dropout_impl): empty_like(input) (feature dropout: an
    (N, C, 1, 1) tensor), bernoulli_(1 - p), div_(1 - p). CUDA element-wise dropout runs the
    fused native_dropout kernel instead: its keep mask, scaled."""
    q = 1 - call.p
    if call.feature:
        n, c = call.shape[:2]
        return torch.empty((n, c, 1, 1), dtype=call.dtype, device=device).bernoulli_(q).div_(q)
    like = torch.empty_strided(call.shape, call.stride, dtype=call.dtype, device=device)
    if device.type == "cuda":
        _, keep = torch.native_dropout(like, call.p, True)
        return keep.to(call.dtype).mul_(1 / q)
    return torch.empty_like(like).bernoulli_(q).div_(q)


class SeedRng:
    """One member's dropout stream: the state the global generators (CPU, and CUDA on a GPU)
    have in a separate one-process run of `seed` (seg.tracking.DropoutRng seeds them with the
    seed), kept aside and swapped in only to draw this member's masks.
    Saved and restored in DropoutRng's format, so a member's checkpoint is a separate run's."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        with self._forked():  # torch.manual_seed's effect on these two generators only
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            self._state = self._get()

    def _forked(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _get(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

    def draw(self, calls: Sequence[DropoutCall]) -> list[Tensor]:
        """This member's noise for the calls of one forward pass, in their order."""
        with self._forked():
            self._set(self._state)
            noise = [_noise(c, self.device) for c in calls]
            self._state = self._get()
        return noise

    def state_dict(self) -> list[dict]:
        return [dict(self._state)]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != 1:
            raise ValueError(f"a checkpoint of {len(states)} ranks cannot resume a member of "
                             "train.num_seeds > 1 (one process)")
        self._state = {k: v.cpu() for k, v in states[0].items()}


def draw_masks(calls: Sequence[DropoutCall], rngs: Sequence[SeedRng]) -> dict[str, Tensor]:
    """{DropoutCall.key: the members' noise stacked (K, ...)}."""
    drawn = [rng.draw(calls) for rng in rngs]
    return {c.key: torch.stack([member[i] for member in drawn]) for i, c in enumerate(calls)}


# ---------------------------------------------------------------- the step

# (words of torch's error, what it means here) for what the first vmapped step can meet
_UNSUPPORTED = (
    ("random operation",  # vmap's default randomness="error" caught a draw
     "the model draws random numbers outside nn.Dropout / nn.Dropout2d, which cannot be "
     "drawn per member under vmap"),
    ("inside vmap is only supported with memory_format",  # torch 2.14, e.g. in interpolate
     "train.compile=True with train.channels_last=True: the compiled model makes a "
     "channels_last copy inside vmap, which torch does not implement; drop one of the two"),
)


def make_train_step(model: nn.Module, loss_fn: Callable, optimizer, schedule, *,
                    trainable: Sequence[str], frozen_modules: Sequence[str] = (),
                    aux_weight: float = 0.0, grad_impl: str = "auto",
                    compile: bool | str = False, donate: bool = False, grad_reduce=None,
                    skip_nonfinite: bool = False, precision: str = "fp32",
                    channels_last: bool = False, checkpoint_activations: bool = False,
                    clip_norm: float = 0.0, loss_scale=None) -> Callable:
    """seg.train.make_train_step for K stacked members (stack_states):
    step(state, batch, rngs) -> (state, metrics), batch = (images (K, B, 3, H, W), masks
    (K, B, H, W)), rngs = the members' SeedRng. Metrics as make_train_step's, each of shape
    (K,) but "lr" (shared). The options mean what they mean there; grad_impl "autograd" maps
    the forward and takes the gradient of the members' summed losses (each member's
    parameters get exactly its own loss's gradient), "func" maps torch.func.grad_and_value.
    Raises ValueError for what cannot run stacked."""
    if skip_nonfinite:
        raise ValueError("train.nonfinite='skip' with train.num_seeds > 1: the members share "
                         "the optimizer's step counter, so one cannot skip a step alone; use "
                         "'stop'")
    if grad_reduce is not None:
        raise ValueError("train.num_seeds > 1 trains its members in one process; with "
                         "torchrun run the seeds as separate jobs")
    if checkpoint_activations:
        raise ValueError("train.checkpoint_activations=True with train.num_seeds > 1: "
                         "torch.utils.checkpoint's recomputation does not run under "
                         "torch.func.vmap")
    if precision == "fp16":
        raise ValueError("train.precision='fp16' with train.num_seeds > 1: each member would "
                         "need its own dynamic loss scale; use bf16 or fp32")
    grad_impl = steps.check_grad_impl(grad_impl, compile, False)
    trainable, frozen_modules = tuple(trainable), tuple(frozen_modules)
    trainable_set = frozenset(trainable)
    plain = steps.make_objective(model, loss_fn, aux_weight=aux_weight, precision=precision,
                                 channels_last=channels_last)  # a separate run's; checks them
    # clipping and the gradient norm per member (stacked): each member's as a separate run's
    update = steps.make_update(optimizer, schedule, donate=donate, clip_norm=clip_norm,
                               stacked=True)
    built: dict[tuple, tuple] = {}  # image shape -> (masked model, dropout calls, core)

    def build(state: steps.TrainState, images: Tensor, labels: Tensor):
        functional.set_mode(model, train=True, frozen=frozen_modules)
        params, buffers = ({k: v[0] for k, v in tree.items()}
                           for tree in (state.params, state.buffers))
        calls = probe_dropout(model, lambda: plain(params, {}, buffers, images[0], labels[0]),
                              images.device)
        masked = mapped_copy(model, calls)
        # channels_last=False: vmap cannot lay out one member's images; train_step does
        objective = steps.make_objective(masked, loss_fn, aux_weight=aux_weight,
                                         precision=precision)
        core = _core(objective, update, trainable, trainable_set, grad_impl)
        if compile:  # the whole step as one graph, as seg.train compiles a run's
            core = torch.compile(core, fullgraph=True,
                                 backend=compile if isinstance(compile, str) else "inductor")
        return masked, calls, core

    def train_step(state: steps.TrainState, batch, rngs: Sequence[SeedRng]):
        images, labels = batch
        if len(rngs) != images.shape[0]:
            raise ValueError(f"{len(rngs)} dropout streams for {images.shape[0]} members")
        key = tuple(images.shape)
        first = key not in built
        if first:
            built[key] = build(state, images, labels)
        masked, calls, core = built[key]
        masks = draw_masks(calls, rngs)
        if channels_last:  # each member's (B, 3, H, W) slice channels_last: (K, B, H, W, 3)
            images = images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        functional.set_mode(masked, train=True, frozen=frozen_modules)
        if not first:
            return core(state, images, labels, masks)
        try:
            return core(state, images, labels, masks)
        except Exception as e:  # what only running the model under vmap finds
            why = next((why for found, why in _UNSUPPORTED if found in str(e)), None)
            if why is None:
                raise
            raise ConfigError(f"train.num_seeds > 1: {why}") from None

    return train_step


def _core(objective: Callable, update: Callable, trainable: tuple, trainable_set: frozenset,
          grad_impl: str) -> Callable:
    """(stacked state, images, labels, dropout noise) -> (state, metrics): the mapped
    gradients, then the element-wise update of all members at once."""

    def core(state: steps.TrainState, images: Tensor, labels: Tensor, masks: dict):
        fixed = {k: v for k, v in state.params.items() if k not in trainable_set}
        train_params = {k: state.params[k] for k in trainable}
        args = (fixed, {**state.buffers, **masks}, images, labels)
        if grad_impl == "func":
            grads, (loss, (new_buffers, parts)) = torch.func.vmap(
                torch.func.grad_and_value(objective, has_aux=True))(train_params, *args)
        else:
            leaves = {k: v.detach().requires_grad_(True) for k, v in train_params.items()}
            with torch.enable_grad():
                loss, (new_buffers, parts) = torch.func.vmap(objective)(leaves, *args)
                # sum: d(sum_j loss_j) / d(params_k) = d(loss_k) / d(params_k), seeded by 1.0
                # as a separate run's backward is
                grads = dict(zip(leaves, torch.autograd.grad(loss.sum(),
                                                             list(leaves.values()))))
            loss = loss.detach()
        new_buffers = {k: new_buffers[k] for k in state.buffers}  # the noise goes
        return update(state, train_params, grads, {"loss": loss, **parts}, new_buffers)

    return core
