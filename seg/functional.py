"""The bridge from nn.Module definitions to pure functions.

A module here is structure only: `init` takes its parameters and buffers out into flat dicts keyed
by state_dict names and moves the module itself to the meta device, so nothing can silently use
tensors stored on it. `apply` runs the module on explicit dicts through `functional_call`.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Params = dict[str, Tensor]
Buffers = dict[str, Tensor]


def init(build: Callable[[], nn.Module], seed: int, device: str | torch.device = "cpu"
         ) -> tuple[nn.Module, Params, Buffers]:
    """Builds a module with a seeded RNG and returns (definition, params, buffers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    params = {k: v.detach().to(device) for k, v in model.named_parameters()}
    buffers = {k: v.detach().to(device) for k, v in model.named_buffers()}
    return model.to("meta"), params, buffers


def apply(model: nn.Module, params: Params, buffers: Buffers, x: Tensor) -> tuple[dict, Buffers]:
    """Runs `model` in its current mode (see `set_mode`); returns (outputs, new buffers).

    In training mode BatchNorm updates its running statistics in place, so it runs on clones of
    the buffers, which are returned: the caller's dicts are never mutated. In eval mode the
    buffers are returned unchanged.
    """
    if model.training:
        buffers = {k: v.clone() for k, v in buffers.items()}
    out = torch.func.functional_call(model, (params, buffers), (x,), strict=True)
    return out, buffers


def set_mode(model: nn.Module, train: bool, frozen: Iterable[str] = ()) -> None:
    """Train/eval mode, with frozen sub-networks kept in eval mode.

    A frozen encoder (a pretrained one kept fixed while the head trains) must also stop updating its BatchNorm statistics,
    otherwise the "frozen" features still drift. Called outside compiled code: flipping
    module flags inside a traced function would be a side effect.
    """
    model.train(train)
    for prefix in frozen:
        model.get_submodule(prefix).eval()


def split_trainable(names: Iterable[str], frozen: Iterable[str]) -> tuple[list[str], list[str]]:
    """Splits parameter names into (trainable, frozen) by module-path prefixes."""
    prefixes = tuple(p.rstrip(".") + "." for p in frozen)
    names = list(names)
    return ([n for n in names if not n.startswith(prefixes)],
            [n for n in names if n.startswith(prefixes)])


def count(tree: Params) -> int:
    return sum(v.numel() for v in tree.values())


def to_channels_last(tree: Params) -> Params:
    """The same dict with its 4-D tensors (conv weights) in channels_last memory format."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
            for k, v in tree.items()}


def recompute_blocks(model: nn.Module, blocks: tuple[type[nn.Module], ...]) -> nn.Module:
    """A copy of the definition in which every module of a type in `blocks` runs under
    activation checkpointing (torch.utils.checkpoint, non-reentrant): the forward keeps only
    each block's inputs and the backward recomputes its activations. Same names, same numbers.

    Raises ValueError when the model has no such block. In training mode BatchNorm inside a
    block updates its statistics again during the recomputation: the caller keeps the
    forward's buffers (seg.train does).
    """
    model = copy.deepcopy(model)
    found = [m for m in model.modules() if isinstance(m, blocks)]
    if not found:
        raise ValueError(f"train.checkpoint_activations=True but {type(model).__name__} has no "
                         f"block to checkpoint (one of {[b.__name__ for b in blocks]})")
    for block in found:
        block.forward = _checkpointed(block)
    return model


def _checkpointed(block: nn.Module) -> Callable:
    # The recomputation runs in the backward, after `apply` has put the meta tensors back on
    # the module, so the block's own tensors are captured as checkpoint inputs and bound again
    # with functional_call. `plain` shares the block's submodules and tensor dicts but keeps the
    # class's forward (copied before the block's forward is replaced).
    plain = copy.copy(block)

    def forward(*args):
        tensors = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
        return checkpoint(torch.func.functional_call, plain, tensors, args, use_reentrant=False)
    return forward
