"""Deterministic batching of an in-memory split for step-based training.

The batch of global step s is a pure function of (data, batch_size, seed, s): positions
[s*B, (s+1)*B) of the concatenated per-epoch permutations (each epoch drops its last partial
batch), with per-sample horizontal flips drawn from a generator seeded by (seed, s). A run
resumed at step k therefore sees exactly the batches the uninterrupted run would have seen.

Data parallel: batch sizes are global. Rank r of world_size ranks gets the r-th contiguous
slice of each global batch, so the ranks together see exactly the single-process batches.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from seg.data.synthetic import SegmentationData, seeded_generator

Batch = tuple[Tensor, Tensor]   # (images float32 (B,3,H,W) normalised, masks int64 (B,H,W))


def train_batches(data: SegmentationData, batch_size: int, seed: int, start_step: int = 0,
                  device="cpu", hflip: bool = True, rank: int = 0, world_size: int = 1
                  ) -> Iterator[Batch]:
    """Endless iterator over full training batches, starting at global step `start_step`:
    this rank's batch_size // world_size samples of each global batch."""
    n = data.images.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (the split's size)")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    _check_rank(rank, world_size)
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is not divisible by the world size "
                         f"{world_size}")
    mine = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    device = torch.device(device)
    mean, std = _stats_on(data, device)
    steps_per_epoch = n // batch_size
    epoch, order = -1, None
    step = start_step
    while True:
        e, i = divmod(step, steps_per_epoch)
        if e != epoch:
            epoch, order = e, torch.randperm(n, generator=seeded_generator("epoch", seed, e))
        index = order[i * batch_size:(i + 1) * batch_size][mine]
        images = _to_device(data.images[index], device)
        masks = _to_device(data.masks[index], device)
        if hflip:
            # drawn for the whole global batch, so a sample's flip does not depend on the rank
            flip = torch.rand(batch_size, generator=seeded_generator("hflip", seed, step)) < 0.5
            images, masks = _flip_where(_to_device(flip[mine], device), images, masks)
        yield normalize(images, mean, std), masks.long()
        step += 1


def eval_batches(data: SegmentationData, batch_size: int, device="cpu", rank: int = 0,
                 world_size: int = 1) -> Iterator[Batch]:
    """Every image once, in order, without augmentation; the last batch may be smaller.

    With several ranks, each gets its contiguous slice of every global batch (slice sizes differ
    by at most one); together they see every image once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    _check_rank(rank, world_size)
    n = data.images.shape[0]
    if world_size > min(batch_size, n):
        raise ValueError(f"eval batch_size={batch_size} and a split of {n} images cannot give "
                         f"each of {world_size} ranks an image")
    device = torch.device(device)
    mean, std = _stats_on(data, device)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        lo, hi = start + rank * size // world_size, start + (rank + 1) * size // world_size
        if lo == hi:  # a short last batch leaves some ranks out
            continue
        images = _to_device(data.images[lo:hi], device)
        masks = _to_device(data.masks[lo:hi], device)
        yield normalize(images, mean, std), masks.long()


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")


def normalize(images_uint8: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
              ) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, on the images' device.

    Same operations in the same order as torchvision's to_dtype(scale=True) + normalize.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"images_uint8.dtype={images_uint8.dtype} must be torch.uint8")
    device = images_uint8.device
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return images_uint8.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def _stats_on(data: SegmentationData, device: torch.device) -> tuple[Tensor, Tensor]:
    # made once per iterator: a per-batch host->device copy of the statistics would be wasted
    return (torch.tensor(data.mean, dtype=torch.float32, device=device),
            torch.tensor(data.std, dtype=torch.float32, device=device))


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    # pinned + non_blocking lets the copy overlap the previous step's compute
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _flip_where(flip: Tensor, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Mirrors along W the samples whose `flip` (B,) is set, image and mask together."""
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    masks = torch.where(flip.view(-1, 1, 1), masks.flip(-1), masks)
    return images, masks
