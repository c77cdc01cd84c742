"""Dynamic loss scaling for float16 mixed precision, as pure functions of device tensors.

float16 keeps 10 mantissa bits and 5 exponent bits: values below 2**-24 flush to zero, and many
gradients of a segmentation network live down there. Multiplying the loss by a scale S before
the backward lifts the gradients into float16's range; dividing them by S afterwards gives the
float32 update back (Micikevicius et al. 2018, "Mixed Precision Training", section 3.2). S is
adapted as training goes: a step whose gradients hold an inf or a NaN overflowed, so it is
skipped and S backed off; after `growth_interval` clean steps in a row S grows.

The rule is torch.amp.GradScaler's (torch/amp/grad_scaler.py and its _amp_update_scale_
kernel), with its defaults: the same gradients give the same skipped steps, scales and growth
counters (tests/test_amp.py). Unlike GradScaler, the state is two 0-dim tensors held in the
train state, and every decision is a torch.where on the device: a step never waits for the host
and compiles into the same graph as the rest of the step.
"""
from __future__ import annotations

from typing import NamedTuple

import warnings

import torch
from torch import Tensor

LossScaleState = dict[str, Tensor]   # {"scale": float32 0-dim, "growth": int32 0-dim}


class LossScale(NamedTuple):
    """The dynamic loss scaling rule (GradScaler's arguments and defaults)."""
    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def check(self) -> "LossScale":
        if not (self.init_scale > 0 and self.init_scale < float("inf")):
            raise ValueError(f"train.loss_scale={self.init_scale!r} must be a positive number")
        if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            raise ValueError(f"train.loss_scale_growth_interval={self.growth_interval!r} must "
                             "be an int >= 1")
        if not self.growth_factor > 1 or not 0 < self.backoff_factor < 1:
            raise ValueError(f"loss scale growth_factor={self.growth_factor!r} must be > 1 and "
                             f"backoff_factor={self.backoff_factor!r} in (0, 1)")
        return self

    def init(self, device: torch.device | str = "cpu") -> LossScaleState:
        return {"scale": torch.full((), self.init_scale, dtype=torch.float32, device=device),
                "growth": torch.zeros((), dtype=torch.int32, device=device)}

    def update(self, state: LossScaleState, found_inf: Tensor) -> LossScaleState:
        """The state after a step; found_inf: 0-dim bool, whether its gradients overflowed.

        Overflow: scale * backoff_factor, counter 0. Otherwise the counter counts the clean
        step, and at growth_interval the scale grows (unless that would overflow float32) and
        the counter restarts. The products are taken in float64 and rounded once to float32,
        as the kernel multiplies a float by a double."""
        scale, growth = state["scale"], state["growth"]
        clean = growth + 1
        grow = clean >= self.growth_interval
        grown = (scale.double() * self.growth_factor).float()
        grown = torch.where(torch.isfinite(grown), grown, scale)
        backed_off = (scale.double() * self.backoff_factor).float()
        new_scale = torch.where(found_inf, backed_off, torch.where(grow, grown, scale))
        new_growth = torch.where(found_inf | grow, torch.zeros_like(clean), clean)
        return {"scale": new_scale, "growth": new_growth.to(torch.int32)}


def unscale(grads: list[Tensor], scale: Tensor) -> list[Tensor]:
    """grads / scale as GradScaler.unscale_ computes it: times the reciprocal taken in float64
    and rounded to float32 (exact for the powers of two that scales are)."""
    inv = scale.double().reciprocal().float()
    return torch._foreach_mul(grads, inv)


def overflowed(grads: list[Tensor]) -> Tensor:
    """Whether any gradient holds an inf or a NaN (0-dim bool, on the device). Element-wise,
    as GradScaler's check: a norm would also call a finite gradient beyond ~1e19 an overflow
    when its square overflows float32."""
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.stack([torch.isfinite(g).all() for g in grads]).all()


def autocast_supported(device_type: str, dtype: torch.dtype = torch.float16) -> bool:
    """Whether torch.autocast runs `dtype` on this device type: torch versions without CPU
    float16 autocast warn and run the forward in float32 instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with torch.autocast(device_type, dtype=dtype):
                pass
        except (UserWarning, RuntimeError):
            return False
    return True
