"""The bridge from nn.Module definitions to pure functions.

A module here is structure only: `init` takes its parameters and buffers out into flat dicts keyed
by state_dict names and moves the module itself to the meta device, so nothing can silently use
tensors stored on it. `apply` runs the module on explicit dicts through `functional_call`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

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

    A frozen encoder (seed 004's `freeze()`) must also stop updating its BatchNorm statistics,
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
