"""Pure optimizers and learning-rate schedules, optax-style, with torch.optim's numerics.

An `Optimizer` is a pair `init(params) -> state`, `update(grads, state, params) -> (params, state)`;
neither mutates its inputs. Unlike optax, `update` returns the new parameters rather than an
"updates" tree: applying the step in torch.optim's own operation order (for SGD a fused
multiply-add `p + (-lr) * d`, for Adam `p + (-step_size * m) / denom`) is what makes the result
bitwise equal to torch.optim (tests/test_optim.py), and splitting it as `u = -lr * d; p = p + u`
would round twice. A `Schedule` maps the optimizer's step counter (0-dim int64 tensor: updates
already done) to the learning rate (0-dim float64 tensor on the same device), so nothing syncs
with the host and torch.compile does not recompile per step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

Schedule = Callable[[Tensor], Tensor]
OptState = dict[str, Any]
Params = dict[str, Tensor]

_F64 = torch.float64


class Optimizer(NamedTuple):
    """init(params) -> state; update(grads, state, params, donate=False) -> (new params, state).

    update steps only the params named in grads (others are returned as they are) and runs
    under no_grad, as torch.optim does: the new params are plain tensors.
    donate=True (as jax.jit's donate_argnums) lets update reuse the storage of grads, state and
    params for its outputs, so the caller must not use those inputs afterwards. Same numbers;
    on CPU it avoids allocating (and page-faulting) a whole model's worth of fresh tensors
    per step, which costs more than the arithmetic.
    fused: update runs torch's fused kernels (torch._fused_sgd_ / _fused_adam_ /
    _fused_adamw_, torch.optim's fused=True), which torch.compile cannot trace.
    """
    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params], tuple[Params, OptState]]
    fused: bool = False


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- schedules
# Closed forms of torch.optim.lr_scheduler's recursive ("chainable") updates: equal up to the
# rounding that the recursion accumulates (~1e-15 relative), and free of per-step state.


def _float_step(step: Tensor, total_steps: int) -> Tensor:
    return step.clamp(max=total_steps).to(_F64)


def constant(lr: float) -> Schedule:
    _require(_number(lr) and lr >= 0, "lr", lr, "must be a number >= 0")

    def schedule(step: Tensor) -> Tensor:
        return torch.full((), lr, dtype=_F64, device=step.device)
    return schedule


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """lr * gamma ** (step // step_size), as StepLR."""
    _require(_number(lr) and lr >= 0, "lr", lr, "must be a number >= 0")
    _require(isinstance(step_size, int) and step_size >= 1, "step_size", step_size,
             "must be an int >= 1")
    _require(gamma > 0, "gamma", gamma, "must be > 0")

    def schedule(step: Tensor) -> Tensor:
        return lr * gamma ** torch.div(step, step_size, rounding_mode="floor").to(_F64)
    return schedule


def cosine(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """Half a cosine from lr to end_lr, as CosineAnnealingLR(T_max=total_steps, eta_min=end_lr).

    Held at end_lr after total_steps, where CosineAnnealingLR would rise again.
    """
    _require(_number(lr) and lr >= 0, "lr", lr, "must be a number >= 0")
    _require(end_lr >= 0, "end_lr", end_lr, "must be >= 0")
    _require(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps,
             "must be an int >= 1")

    def schedule(step: Tensor) -> Tensor:
        t = _float_step(step, total_steps)
        return end_lr + (lr - end_lr) * (1 + torch.cos(math.pi * t / total_steps)) / 2
    return schedule


def poly(lr: float, total_steps: int, power: float = 0.9, end_lr: float = 0.0) -> Schedule:
    """(lr - end_lr) * (1 - step / total_steps) ** power + end_lr, held at end_lr afterwards.

    With end_lr=0 this is PolynomialLR(total_iters=total_steps, power=power).
    """
    _require(_number(lr) and lr >= 0, "lr", lr, "must be a number >= 0")
    _require(end_lr >= 0, "end_lr", end_lr, "must be >= 0")
    _require(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps,
             "must be an int >= 1")
    _require(power >= 0, "power", power, "must be >= 0")

    def schedule(step: Tensor) -> Tensor:
        t = _float_step(step, total_steps)
        return (lr - end_lr) * (1 - t / total_steps) ** power + end_lr
    return schedule


def warmup(schedule: Schedule, warmup_steps: int, start_factor: float = 0.1) -> Schedule:
    """Multiplies `schedule` by a factor rising linearly from start_factor to 1 over warmup_steps.

    As ChainedScheduler([LinearLR(start_factor, total_iters=warmup_steps), main]) for the
    multiplicative torch schedules (StepLR, PolynomialLR, cosine with end_lr=0; torch's recursive
    cosine with eta_min > 0 does not chain as a product). The main schedule is not shifted.
    warmup_steps=0 returns `schedule` itself.
    """
    _require(warmup_steps >= 0, "warmup_steps", warmup_steps, "must be >= 0")
    _require(0 < start_factor <= 1, "warmup_start_factor", start_factor, "must be in (0, 1]")
    if warmup_steps == 0:
        return schedule

    def warmed(step: Tensor) -> Tensor:
        t = _float_step(step, warmup_steps)
        return (start_factor + (1 - start_factor) * t / warmup_steps) * schedule(step)
    return warmed


# ---------------------------------------------------------------- optimizers
# Scalars that torch.optim computes in Python floats (lr, bias corrections) are float64 0-dim
# tensors here; the kernels cast them to the parameter dtype exactly where torch's kernels cast
# the Python float.


def _as_schedule(learning_rate: float | Schedule) -> Schedule:
    if callable(learning_rate):
        return learning_rate
    _require(_number(learning_rate) and learning_rate >= 0, "learning_rate", learning_rate,
             "must be a number >= 0 or a schedule")
    return constant(learning_rate)


def _zero_count(params: Params) -> Tensor:
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _zeros(params: Params) -> Params:
    return {k: torch.zeros_like(p) for k, p in params.items()}


def _lists(names: list[str], *trees: Params) -> list[list[Tensor]]:
    return [[tree[k] for k in names] for tree in trees]


def _merge(tree: Params, names: list[str], values: list[Tensor]) -> Params:
    return {**tree, **dict(zip(names, values))}


def _foreach(name: str, donate: bool) -> Callable[..., list[Tensor]]:
    """torch._foreach_<name>, or with donate its in-place form, returning the updated list."""
    if not donate:
        return getattr(torch, f"_foreach_{name}")
    inplace = getattr(torch, f"_foreach_{name}_")

    def call(xs: list[Tensor], *args, **kwargs) -> list[Tensor]:
        inplace(xs, *args, **kwargs)
        return xs
    return call


def _fma(p: list[Tensor], d: list[Tensor], scale: Tensor, donate: bool = False) -> list[Tensor]:
    """p + scale * d rounded once, as `p.add(d, alpha=float)` (its vectorised CPU kernel is a
    fused multiply-add). A tensor scale cannot be an alpha; addcmul takes it and, measured on
    CPU, rounds bitwise the same way, where mul-then-add rounds twice."""
    return _foreach("addcmul", donate)(p, d, [scale] * len(p))


def _chunks(tensors: list[Tensor], max_numel: int = 1 << 22) -> list[slice]:
    """Consecutive slices of `tensors` of at most `max_numel` elements each (or one tensor).

    Temporaries made per slice are freed before the next one, so the allocator reuses their
    memory; on CPU, temporaries the size of the whole model are fresh pages every step, and
    faulting them in cost 3x the arithmetic (measured on UNet's 31M parameters).
    """
    slices, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > max_numel:
            slices.append(slice(start, i))
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        slices.append(slice(start, len(tensors)))
    return slices


def sgd(learning_rate: float | Schedule, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, dampening: float = 0.0, fused: bool = False) -> Optimizer:
    """torch.optim.SGD: L2 weight decay added to the gradient, heavy-ball or Nesterov momentum.
    fused: torch.optim.SGD(fused=True)'s kernel (no dampening: its first step is a Python flag)."""
    schedule = _as_schedule(learning_rate)
    _require(0 <= momentum < 1, "momentum", momentum, "is not in [0, 1)")
    _require(0 <= dampening <= 1, "dampening", dampening, "is not in [0, 1]")
    _require(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")
    _require(not nesterov or (momentum > 0 and dampening == 0), "nesterov", nesterov,
             f"needs momentum > 0 and dampening == 0 (got momentum={momentum!r}, "
             f"dampening={dampening!r})")

    _require(not fused or not dampening, "dampening", dampening, "must be 0 with fused=True")

    def init(params: Params) -> OptState:
        state = {"count": _zero_count(params)}
        if momentum:
            state["momentum"] = _zeros(params)
        return state

    if fused:
        return Optimizer(init, _fused_sgd_update(schedule, momentum, nesterov, weight_decay),
                         fused=True)

    @torch.no_grad()
    def update(grads: Params, state: OptState, params: Params, donate: bool = False
               ) -> tuple[Params, OptState]:
        names = list(grads)
        g, p = _lists(names, grads, params)
        count = state["count"]
        lr = schedule(count)
        if weight_decay:
            g = _foreach("add", donate)(g, p, alpha=weight_decay)
        new_state = {"count": count + 1}
        if momentum:
            # Zero-initialised, so the first step gives buf = g as torch's clone of the gradient.
            buf = _foreach("mul", donate)([state["momentum"][k] for k in names], momentum)
            if dampening:
                # torch seeds the buffer with the undamped gradient on the first step.
                alpha = 1.0 - dampening * (count > 0).to(_F64)
                buf = _fma(buf, g, alpha, donate=True)  # buf is already this step's own
            else:
                torch._foreach_add_(buf, g)
            new_state["momentum"] = _merge(state["momentum"], names, buf)
            g = _foreach("add", donate)(g, buf, alpha=momentum) if nesterov else buf
        return _merge(params, names, _fma(p, g, -lr, donate)), new_state

    return Optimizer(init, update)


def _adam(learning_rate: float | Schedule, b1: float, b2: float, eps: float,
          weight_decay: float, decoupled: bool, fused: bool = False) -> Optimizer:
    schedule = _as_schedule(learning_rate)
    _require(0 <= b1 < 1, "b1", b1, "is not in [0, 1)")
    _require(0 <= b2 < 1, "b2", b2, "is not in [0, 1)")
    _require(eps >= 0, "eps", eps, "must be >= 0")
    _require(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")

    def init(params: Params) -> OptState:
        return {"count": _zero_count(params), "mu": _zeros(params), "nu": _zeros(params)}

    if fused:
        return Optimizer(init, _fused_adam_update(schedule, b1, b2, eps, weight_decay, decoupled),
                         fused=True)

    @torch.no_grad()
    def update(grads: Params, state: OptState, params: Params, donate: bool = False
               ) -> tuple[Params, OptState]:
        names = list(grads)
        g, p, mu, nu = _lists(names, grads, params, state["mu"], state["nu"])
        count = state["count"]
        lr = schedule(count)
        if weight_decay and decoupled:
            p = _foreach("mul", donate)(p, 1 - lr * weight_decay)
        elif weight_decay:
            g = _foreach("add", donate)(g, p, alpha=weight_decay)
        mu = _foreach("lerp", donate)(mu, g, 1 - b1)
        nu = _foreach("mul", donate)(nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        t = (count + 1).to(_F64)
        bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
        # torch takes `bias2 ** 0.5` in Python, i.e. C pow(); a tensor exponent keeps torch.pow
        # off its sqrt shortcut, which differs in the last bit for ~1% of float64 inputs.
        bias2_sqrt = torch.pow(bias2, torch.full_like(bias2, 0.5))
        new_p = []
        for part in _chunks(p):
            denom = torch._foreach_sqrt(nu[part])
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, eps)
            # torch's addcdiv_(m, denom, value=-step_size) computes p + (value * m) / denom.
            scaled = torch._foreach_mul(mu[part], -lr / bias1)
            new_p += _foreach("addcdiv", donate)(p[part], scaled, denom)
        new_state = {"count": count + 1, "mu": _merge(state["mu"], names, mu),
                     "nu": _merge(state["nu"], names, nu)}
        return _merge(params, names, new_p), new_state

    return Optimizer(init, update)


def adam(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, fused: bool = False) -> Optimizer:
    """torch.optim.Adam: weight decay is L2, added to the gradient before the moments.
    fused: torch.optim.Adam(fused=True)'s kernel."""
    return _adam(learning_rate, b1, b2, eps, weight_decay, decoupled=False, fused=fused)


def adamw(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, fused: bool = False) -> Optimizer:
    """torch.optim.AdamW: decoupled decay, p *= 1 - lr * weight_decay before the Adam step.
    fused: torch.optim.AdamW(fused=True)'s kernel."""
    return _adam(learning_rate, b1, b2, eps, weight_decay, decoupled=True, fused=fused)


# ---------------------------------------------------------------- fused kernels
# torch.optim's fused=True kernels do a whole update in one pass over each tensor (one launch
# per group of tensors on CUDA), updating params and state in place: here they run on copies,
# or on the inputs themselves with donate=True. Their arithmetic is their own (within a few ulp
# of the foreach update), and the same as torch.optim(fused=True) given the same inputs.


def _kernel_lr(lr: Tensor) -> Tensor:
    """The lr tensor a fused kernel reads: on CPU it takes the value as a double (as torch.optim
    passes a Python float), on CUDA it reads a float32 from device memory."""
    return lr if lr.device.type == "cpu" else lr.float()


def _owned(tensors: list[Tensor], donate: bool) -> list[Tensor]:
    return tensors if donate else [t.clone() for t in tensors]


def _fused_sgd_update(schedule: Schedule, momentum: float, nesterov: bool, weight_decay: float):
    @torch.no_grad()
    def update(grads: Params, state: OptState, params: Params, donate: bool = False
               ) -> tuple[Params, OptState]:
        names = list(grads)
        g, p = _lists(names, grads, params)
        p, g = _owned(p, donate), _owned(g, donate)   # the kernel writes both
        count = state["count"]
        bufs = _owned([state["momentum"][k] for k in names], donate) if momentum else []
        # Zero-initialised buffers: momentum * 0 + g is g, torch's first step, so the kernel's
        # is_first_step (a Python flag) can stay False.
        torch._fused_sgd_(p, g, bufs, weight_decay=weight_decay, momentum=momentum,
                          lr=_kernel_lr(schedule(count)), dampening=0.0, nesterov=nesterov,
                          maximize=False, is_first_step=False)
        new_state = {"count": count + 1}
        if momentum:
            new_state["momentum"] = _merge(state["momentum"], names, bufs)
        return _merge(params, names, p), new_state

    return update


def _fused_adam_update(schedule: Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                       decoupled: bool):
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    @torch.no_grad()
    def update(grads: Params, state: OptState, params: Params, donate: bool = False
               ) -> tuple[Params, OptState]:
        names = list(grads)
        g, p, mu, nu = _lists(names, grads, params, state["mu"], state["nu"])
        p, g, mu, nu = (_owned(x, donate) for x in (p, g, mu, nu))
        count = state["count"]
        # the kernel reads the step number (after this update) as a float per tensor
        steps = [(count + 1).to(torch.float32)] * len(p)
        kernel(p, g, mu, nu, [], steps, lr=_kernel_lr(schedule(count)), beta1=b1, beta2=b2,
               weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        new_state = {"count": count + 1, "mu": _merge(state["mu"], names, mu),
                     "nu": _merge(state["nu"], names, nu)}
        return _merge(params, names, p), new_state

    return update


# ---------------------------------------------------------------- gradient norm


def global_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients taken together (0-dim, on their device): the norm of their
    per-tensor norms, as torch.nn.utils.clip_grad_norm_ computes it."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)), 2)


def clip_by_global_norm(grads: list[Tensor], max_norm: float, norm: Tensor) -> list[Tensor]:
    """grads * min(1, max_norm / (norm + 1e-6)): clip_grad_norm_'s arithmetic, with no
    branch on the norm (a branch would read it back to the host)."""
    return torch._foreach_mul(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))


# ---------------------------------------------------------------- from config


def _choice(field: str, name: Any, options: tuple[str, ...]) -> None:
    _require(name in options, field, name, f"is not one of {options}")


def _build_schedule(cfg, lr: float, total_steps: int) -> Schedule:
    """config.schedule fields: name, warmup_steps, warmup_start_factor, step_size, gamma, power,
    end_lr (each read only by the schedule that uses it)."""
    name = cfg.get("name")
    _choice("schedule.name", name, ("constant", "step", "cosine", "poly"))
    end_lr = cfg.get("end_lr", 0.0)
    if name == "constant":
        main = constant(lr)
    elif name == "step":
        main = step_decay(lr, cfg.get("step_size"), cfg.get("gamma", 0.1))
    elif name == "cosine":
        main = cosine(lr, total_steps, end_lr)
    else:
        main = poly(lr, total_steps, cfg.get("power", 0.9), end_lr)
    return warmup(main, cfg.get("warmup_steps", 0), cfg.get("warmup_start_factor", 0.1))


def build(opt_cfg, sched_cfg, total_steps: int) -> tuple[Optimizer, Schedule]:
    """(config.optimizer, config.schedule, steps) -> (optimizer, its schedule, for logging).

    config.optimizer fields: name ('sgd' | 'adam' | 'adamw'), lr, fused, and those the
    optimizer uses: momentum, nesterov, weight_decay (sgd); b1, b2, eps, weight_decay (adam,
    adamw). (optimizer.clip_norm is applied by the train step, which has the norm.)
    """
    name = opt_cfg.get("name")
    _choice("optimizer.name", name, ("sgd", "adam", "adamw"))
    fused = opt_cfg.get("fused", False)
    _require(isinstance(fused, bool), "optimizer.fused", fused, "must be True or False")
    schedule = _build_schedule(sched_cfg, opt_cfg.get("lr"), total_steps)
    if name == "sgd":
        optimizer = sgd(schedule, momentum=opt_cfg.get("momentum", 0.0),
                        nesterov=opt_cfg.get("nesterov", False),
                        weight_decay=opt_cfg.get("weight_decay", 0.0), fused=fused)
    else:
        make, default_decay = (adam, 0.0) if name == "adam" else (adamw, 0.01)
        optimizer = make(schedule, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.999),
                         eps=opt_cfg.get("eps", 1e-8),
                         weight_decay=opt_cfg.get("weight_decay", default_decay), fused=fused)
    return optimizer, schedule
