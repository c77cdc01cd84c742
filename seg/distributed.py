"""Data parallel helpers on torch.distributed (launched with torchrun).

Every rank holds the whole train state and a contiguous slice of each global batch. The train
step averages the gradients (and the loss) across ranks in ONE collective over a flattened
buffer, so the optimizer sees the same numbers on every rank and the parameters stay bitwise
identical. BatchNorm either synchronises its batch moments in the forward (`SyncBatchNorm2d`) or
keeps per-rank running statistics that the caller averages (`average_buffers`) before it
evaluates or saves them.

Pure helpers: nothing here reads the environment on its own or keeps global state; the process
group is torch.distributed's default group unless one is passed.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any, Iterator, Mapping, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

Group = Any  # a torch.distributed ProcessGroup; None = the default group


class WorldInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int  # the rank's index on its machine: its GPU


class World(NamedTuple):
    """This process's place in a running job: its rank, the number of ranks and their process
    group (None for one process)."""
    rank: int = 0
    size: int = 1
    group: Group | None = None

    @property
    def writes(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0


def world_info(env: Mapping[str, str]) -> WorldInfo:
    """The process's place in the job from torchrun's variables; one process when they are
    absent."""
    try:
        info = WorldInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                         int(env.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} is not in [0, WORLD_SIZE={info.world_size})")
    return info


@contextlib.contextmanager
def process_group(info: WorldInfo, device: torch.device) -> Iterator[Group | None]:
    """Joins the job's default process group (env:// rendezvous: torchrun's MASTER_ADDR and
    MASTER_PORT) for the duration; NCCL for CUDA devices, gloo otherwise. Yields None for a
    single process, and the caller's group, left open, when one is already initialised."""
    if info.world_size == 1:
        yield None
        return
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=info.rank,
                            world_size=info.world_size, device_id=device if cuda else None)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _flat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    parts = torch.split(flat, [t.numel() for t in like])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, like)]


def _all_reduce_flat(tensors: list[Tensor], dtype: torch.dtype, group: Group | None) -> Tensor:
    # One all-reduce per tensor measured ~3x slower than one over a flat buffer (gloo, 2 ranks).
    flat = _flat(tensors, dtype)
    dist.all_reduce(flat, group=group)
    return flat


def mean_across(tensors: list[Tensor], group: Group | None = None) -> list[Tensor]:
    """Element-wise means over the ranks, in one collective (float tensors)."""
    if not tensors:
        return []
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = _all_reduce_flat(tensors, dtype, group)
    return _unflat(flat.div_(dist.get_world_size(group)), tensors)  # the buffer is ours


def sum_across(tensors: list[Tensor], group: Group | None = None) -> list[Tensor]:
    """Element-wise sums over the ranks, in one float64 collective: integer counts (confusion
    matrices) stay exact below 2**53."""
    return _unflat(_all_reduce_flat(tensors, torch.float64, group), tensors) if tensors else []


def make_grad_reduce(group: Group | None = None):
    """grad_reduce(grads, losses) -> (grads, losses) averaged over the ranks, for
    seg.train.make_train_step. The loss scalars ride in the gradients' collective: the logged
    losses are the global ones, and a non-finite loss on any rank is non-finite on all of them,
    so every rank takes the same skip / stop decision."""

    def grad_reduce(grads: dict[str, Tensor], scalars: dict[str, Tensor]
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        averaged = mean_across([*grads.values(), *scalars.values()], group)
        return (dict(zip(grads, averaged[:len(grads)])),
                dict(zip(scalars, averaged[len(grads):])))

    return grad_reduce


class BucketedGradReduce:
    """A grad_reduce (as make_grad_reduce's) that overlaps the all-reduce of the gradients with
    the backward, as DistributedDataParallel does (Li et al. 2020, "PyTorch Distributed:
    Experiences on Accelerating Data Parallel Training", section 3.2): the trainable parameters
    are cut into buckets of about bucket_mb, in reverse order (about the order the backward
    produces their gradients), and a bucket's all-reduce starts, asynchronously, as soon as its
    last gradient exists, while the backward goes on with the layers before it.

    seg.train's eager step (grad_impl='autograd') calls `attach(leaves)` before its backward:
    hooks on the leaf tensors collect the gradients and launch the buckets. Calling the object
    with the backward's gradients then waits for the buckets, launches any that never filled,
    and averages the loss scalars; the numbers are those of make_grad_reduce (the same sums,
    divided by the same world size). A step that never attaches (torch.func, torch.compile)
    gets one all-reduce after the backward, as make_grad_reduce, and so does a model of fewer
    than MIN_BUCKETS buckets. Holds the state of one step between attach and the call: one
    object per train step.
    """

    # Fewer buckets than this: one all-reduce after the backward. With two, the first fills
    # late in the backward and little is left to overlap: measured 3-7% slower than one
    # all-reduce (2 ranks, gloo; README), where four were 8-12% faster.
    MIN_BUCKETS = 3

    def __init__(self, group: Group | None = None, bucket_mb: float = 25.0):
        if not bucket_mb > 0:
            raise ValueError(f"train.grad_bucket_mb={bucket_mb!r} must be > 0 here")
        self.group, self.cap = group, int(bucket_mb * 2 ** 20)
        self.buckets: list[list[str]] = []
        self.started_in_backward = 0   # of the last step's buckets (for tests, benchmarks)
        self.flat = make_grad_reduce(group)   # the same average, one all-reduce after
        self._step: dict | None = None

    def _bucket(self, leaves: dict[str, Tensor]) -> list[list[str]]:
        buckets, current, size = [], [], 0
        for name in reversed(list(leaves)):
            current.append(name)
            size += leaves[name].numel() * leaves[name].element_size()
            if size >= self.cap:
                buckets.append(current)
                current, size = [], 0
        return buckets + ([current] if current else [])

    def attach(self, leaves: dict[str, Tensor]) -> None:
        self.buckets = self._bucket(leaves)
        if len(self.buckets) < self.MIN_BUCKETS:
            self._step = None
            return
        where = {name: i for i, bucket in enumerate(self.buckets) for name in bucket}
        step = self._step = {"ready": [{} for _ in self.buckets], "launched": {}}

        def hook(name: str):
            def collect(grad: Tensor) -> Tensor:
                i = where[name]
                step["ready"][i][name] = grad
                if len(step["ready"][i]) == len(self.buckets[i]):
                    step["launched"][i] = self._launch(self.buckets[i], step["ready"][i])
                return grad
            return collect

        for name, leaf in leaves.items():
            leaf.register_hook(hook(name))

    def _launch(self, bucket: list[str], grads: dict[str, Tensor]):
        """(flat buffer, work) of the bucket's all-reduce, started asynchronously."""
        dtype = functools.reduce(torch.promote_types, (grads[n].dtype for n in bucket))
        flat = _flat([grads[name] for name in bucket], dtype)
        return flat, dist.all_reduce(flat, group=self.group, async_op=True)

    def __call__(self, grads: dict[str, Tensor], scalars: dict[str, Tensor]
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        step, self._step = self._step, None
        if step is None:
            self.started_in_backward = 0
            return self.flat(grads, scalars)
        self.started_in_backward = len(step["launched"])
        for i, bucket in enumerate(self.buckets):   # a bucket whose hooks did not all fire
            if i not in step["launched"]:
                step["launched"][i] = self._launch(bucket, grads)
        size = dist.get_world_size(self.group)
        averaged = {}
        for i, bucket in enumerate(self.buckets):
            flat, work = step["launched"][i]
            work.wait()
            like = [grads[name] for name in bucket]
            averaged.update(zip(bucket, _unflat(flat.div_(size), like)))
        values = mean_across(list(scalars.values()), self.group)
        return {k: averaged[k] for k in grads}, dict(zip(scalars, values))


def grad_reducer(group: Group | None = None, bucket_mb: float = 25.0):
    """The train step's gradient average over the ranks: overlapped with the backward in
    buckets of bucket_mb (BucketedGradReduce), or with bucket_mb=0 one all-reduce after it."""
    if bucket_mb < 0:
        raise ValueError(f"train.grad_bucket_mb={bucket_mb!r} must be >= 0 (0: one all-reduce "
                         "after the backward)")
    return BucketedGradReduce(group, bucket_mb) if bucket_mb else make_grad_reduce(group)


def average_buffers(buffers: dict[str, Tensor], group: Group | None = None) -> dict[str, Tensor]:
    """BatchNorm running statistics averaged over the ranks; every other buffer is the same on
    every rank and kept: counters (num_batches_tracked) and constant tables (Swin's relative
    position index and coordinates), which a float mean over 3 ranks could move by an ulp."""
    names = [k for k in buffers if k.endswith((".running_mean", ".running_var"))]
    averaged = dict(zip(names, mean_across([buffers[k] for k in names], group)))
    return {k: averaged.get(k, v) for k, v in buffers.items()}


def gather_objects(obj: Any, group: Group | None = None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: RNG states)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks: the gradient of a sum is the sum of the gradients.
    setup_context (not ctx in forward) is what lets torch.func.grad run it."""

    @staticmethod
    def forward(x: Tensor, group: Group | None) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode moments are those of the global batch (all ranks).

    torch.nn.SyncBatchNorm runs on CUDA only and its autograd.Function does not support
    torch.func; this one works on gloo and NCCL, under torch.autograd.grad, torch.func.grad and
    torch.compile. One collective per layer in the forward (per-channel sum, sum of squares and
    pixel count) and one in the backward. The sums are taken around the running mean, which is
    the same on every rank and near the batch mean, so E[x^2] - E[x]^2 does not cancel away the
    variance. Eval mode (and frozen modules) is plain BatchNorm2d on the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group: Group | None = None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        shift = (self.running_mean.detach() if self.running_mean is not None
                 else x.new_zeros(channels, dtype=torch.float32)).view(1, -1, 1, 1)
        d = x.float() - shift
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), count]),
                                    self.group)
        total = stats[-1]
        offset = stats[:channels] / total
        mean, var = shift.view(-1) + offset, stats[channels:2 * channels] / total - offset * offset
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        bias = -mean * scale + (self.bias if self.affine else 0)
        if self.track_running_stats:
            n = total.detach()
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        return torch.addcmul(bias.view(1, -1, 1, 1), x.float(), scale.view(1, -1, 1, 1)
                             ).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        # functional.apply runs train mode on clones of the buffers: in place is safe here.
        self.num_batches_tracked.add_(1)
        factor = (self.momentum if self.momentum is not None
                  else 1.0 / self.num_batches_tracked.float())
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def _device_of(module: nn.Module) -> torch.device:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return next(tensors, torch.empty(0, device="meta")).device


def convert_sync_batchnorm(model: nn.Module, group: Group | None = None) -> nn.Module:
    """Replaces every BatchNorm2d of `model` (in place) by a SyncBatchNorm2d with the same
    settings, on the same device (meta for seg.functional models): state_dict names, hence
    params and buffers dicts, are unchanged."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, group,
                                   device=_device_of(child))
            sync.train(child.training)
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, group)
    return model
