"""Batches of a SegDataset on the device: one pipeline for every dataset, synthetic included.

Train: the batch of global step s is a pure function of (dataset, transform, batch_size, seed,
s): positions [s*B, (s+1)*B) of the concatenated per-epoch permutations (each epoch drops its
last partial batch), and the sample at position j of step s is augmented with torch's global
generator seeded by (seed, s, j) just before its transform runs. The number of workers plays no
part, and a run resumed at step k sees exactly the batches of the uninterrupted run. With data
parallel, rank r of W takes the r-th contiguous slice of the global batch, so the ranks
together see the batch one process sees.

Eval: every sample of the rank's contiguous share once, in order, each padded on its own (never
to the size of another image: what a network sees of an image must not depend on its
batch-mates), and batched with the samples of the same padded size.

Workers send uint8 batches; the copy to the device is issued `prefetch` batches ahead (from
pinned memory on a side stream on CUDA), and normalisation runs on the device.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from seg.data import augment
from seg.data.dataset import SegDataset
from seg.data.synthetic import seeded_generator, stable_seed

Batch = tuple[Tensor, Tensor]   # (images float32 (B,3,H,W) normalised, masks int64 (B,H,W))
Transform = Callable   # seg.data.augment' train_transform / eval_transform; None = none


def train_batches(dataset: SegDataset, transform: Transform | None, batch_size: int, seed: int,
                  start_step: int = 0, device="cpu", workers: int = 0, prefetch: int = 2,
                  rank: int = 0, world_size: int = 1, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Iterator[Batch]:
    """Endless iterator over this rank's part of the global batches from step `start_step`.

    batch_size is the global batch; mean/std default to dataset.info's.
    """
    n = len(dataset)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (the split's size)")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    _check_ranks(rank, world_size)
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
    sampler = _TrainSampler(n, batch_size, (seed,), start_step, rank, world_size)
    host = _loader(dataset, transform, sampler, _stack, device, workers, seed, persistent=True)
    return _on_device(host, device, prefetch, *_stats(dataset, mean, std))


def member_batches(dataset: SegDataset, transform: Transform | None, batch_size: int,
                   seeds: Sequence[int], start_step: int = 0, device="cpu", workers: int = 0,
                   prefetch: int = 2, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> Iterator[Batch]:
    """The train batches of K runs at once, one per seed (train.num_seeds, seg/seeds.py):
    images (K, B, 3, H, W) and masks (K, B, H, W), member k's being exactly
    train_batches(..., seeds[k])'s: its own order and augmentation, so that it trains on what
    a separate run of its seed trains on. One loader reads all K * B samples of a step."""
    n = len(dataset)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (the split's size)")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    k = len(seeds)
    if k < 1:
        raise ValueError("member_batches needs at least one seed")
    sampler = _TrainSampler(n, batch_size, tuple(seeds), start_step, 0, 1)
    host = _loader(dataset, transform, sampler, _stack, device, workers, seeds[0],
                   persistent=True)
    stacked = _on_device(host, device, prefetch, *_stats(dataset, mean, std))
    return ((images.view(k, batch_size, *images.shape[1:]),
             masks.view(k, batch_size, *masks.shape[1:])) for images, masks in stacked)


def eval_batches(dataset: SegDataset, transform: Transform | None, batch_size: int,
                 device="cpu", workers: int = 0, pad_multiple: int = 1, rank: int = 0,
                 world_size: int = 1, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, prefetch: int = 2,
                 indices: bool = False) -> Iterator[Batch]:
    """Every sample of this rank's contiguous share once, in order, at most batch_size at a time.

    Each sample is padded at the bottom and right to its own size rounded up to a multiple of
    pad_multiple: the mask with ignore_index, so padded pixels never count (a sample's
    prediction is the top-left crop of its padded one), the image with the mean colour (~0 once
    normalised). Of every batch_size samples read, those of the same padded size go through
    together: with images of one size (most datasets, and any crop) the batches are full; with
    mixed sizes (VOC, ADE20K) a batch holds the neighbours that share a size, and the numbers do
    not depend on batch_size. mean/std default to dataset.info's. indices: each batch is
    (images, masks, dataset indices of its samples (int64, on the CPU)), for per-image results."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if pad_multiple < 1:
        raise ValueError(f"data.pad_multiple={pad_multiple} must be >= 1")
    _check_ranks(rank, world_size)
    n = len(dataset)
    if n < world_size:  # a rank without images would leave the others waiting in the all-reduce
        raise ValueError(f"the split's {n} images cannot give each of {world_size} ranks one")
    share = range(n * rank // world_size, n * (rank + 1) // world_size)
    keys = [(i, None) for i in share]
    sampler = [keys[k:k + batch_size] for k in range(0, len(keys), batch_size)]
    mean, std = _stats(dataset, mean, std)
    collate = _Padder(pad_multiple, augment.mean_colour(mean), dataset.info.ignore_index)
    host = _loader(dataset, transform, sampler, collate, device, workers, 0, persistent=False)
    batches = _on_device(host, device, prefetch, mean, std)
    return batches if indices else (batch[:2] for batch in batches)


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


def sample_seed(seed: int, step: int, position: int) -> int:
    """The global-generator seed for the sample at `position` of the global batch of `step`."""
    return stable_seed("augment", seed, step, position)


class _TrainSampler:
    """Yields, per step, this rank's [(dataset index, sample seed), ...]; with several seeds,
    each seed's keys in turn (the batches of runs that differ only in their seed)."""

    def __init__(self, n, batch_size, seeds, start_step, rank, world_size):
        self.n, self.batch_size, self.seeds, self.start_step = n, batch_size, seeds, start_step
        self.local = batch_size // world_size
        self.first = rank * self.local

    def __iter__(self):
        steps_per_epoch = self.n // self.batch_size
        epoch, orders = -1, None
        for step in itertools.count(self.start_step):
            e, i = divmod(step, steps_per_epoch)
            if e != epoch:
                epoch = e
                orders = [torch.randperm(self.n, generator=seeded_generator("epoch", seed, e))
                          for seed in self.seeds]
            positions = range(self.first, self.first + self.local)
            yield [(int(order[i * self.batch_size + j]), sample_seed(seed, step, j))
                   for seed, order in zip(self.seeds, orders) for j in positions]


class _Transformed(Dataset):
    """dataset + transform, fetched a batch of (index, seed) keys at a time."""

    def __init__(self, dataset: SegDataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int | None]]) -> list[tuple[Tensor, Tensor, int]]:
        """(image, mask, dataset index) per key."""
        if torch.utils.data.get_worker_info() is not None:   # a worker's generator is its own
            return [(*self._sample(i, s), i) for i, s in keys]
        with torch.random.fork_rng(devices=[]):               # the main process's is not
            return [(*self._sample(i, s), i) for i, s in keys]

    def _sample(self, i: int, seed: int | None) -> tuple[Tensor, Tensor]:
        image, mask = self.dataset.read(i)
        if (image.dtype, mask.dtype) != (torch.uint8, torch.uint8) or image.ndim != 3 \
                or image.shape[0] != 3 or image.shape[1:] != mask.shape:
            raise ValueError(f"sample {i} ({self.dataset.source(i) or 'generated'}): expected "
                             f"uint8 image (3,H,W) and mask (H,W), got {image.dtype} "
                             f"{tuple(image.shape)} and {mask.dtype} {tuple(mask.shape)}")
        if seed is not None:
            # only the CPU generator: torch.manual_seed would also reseed CUDA's
            torch.default_generator.manual_seed(seed)
        return augment.apply(self.transform, image, mask)


def _stack(samples: list[tuple[Tensor, Tensor, int]]) -> list[tuple[Tensor, Tensor]]:
    sizes = {tuple(mask.shape) for _, mask, _ in samples}
    if len(sizes) > 1:
        raise ValueError(f"train samples differ in size {sorted(sizes)[:2]}...: set "
                         f"data.crop_size (or data.resize with a crop) to batch them")
    images, masks, _ = zip(*samples)
    return [(torch.stack(images), torch.stack(masks))]


class _Padder:
    """Collates samples of any size into batches of one size each: every sample padded at the
    bottom/right to its own size rounded up to a multiple of `multiple`, then grouped by that
    size (groups in the order of their first sample)."""

    def __init__(self, multiple: int, fill: tuple[int, int, int], ignore_index: int):
        self.multiple, self.fill, self.ignore_index = multiple, fill, ignore_index

    def __call__(self, samples: list[tuple[Tensor, Tensor, int]]
                 ) -> list[tuple[Tensor, Tensor, Tensor]]:
        groups: dict[tuple[int, int], list] = {}
        for sample in samples:
            groups.setdefault(self._padded_size(sample[1]), []).append(sample)
        return [self._pad(size, group) for size, group in groups.items()]

    def _padded_size(self, mask: Tensor) -> tuple[int, int]:
        m = self.multiple
        return -(-mask.shape[0] // m) * m, -(-mask.shape[1] // m) * m

    def _pad(self, size: tuple[int, int], samples: list) -> tuple[Tensor, Tensor, Tensor]:
        images = torch.tensor(self.fill, dtype=torch.uint8).view(1, 3, 1, 1).repeat(
            len(samples), 1, *size)
        masks = torch.full((len(samples), *size), self.ignore_index, dtype=torch.uint8)
        for k, (image, mask, _) in enumerate(samples):
            images[k, :, :mask.shape[0], :mask.shape[1]] = image
            masks[k, :mask.shape[0], :mask.shape[1]] = mask
        return images, masks, torch.tensor([i for _, _, i in samples], dtype=torch.int64)


def _check_ranks(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def _loader(dataset, transform, batch_sampler, collate, device, workers, seed, persistent):
    if workers < 0:
        raise ValueError(f"data.workers={workers} must be >= 0")
    return iter(DataLoader(
        _Transformed(dataset, transform), batch_sampler=batch_sampler, collate_fn=collate,
        num_workers=workers, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=persistent and workers > 0,
        # its own generator: DataLoader otherwise draws its base seed from the global one
        generator=seeded_generator("loader", seed)))


def _stats(dataset: SegDataset, mean, std) -> tuple[Sequence[float], Sequence[float]]:
    return (dataset.info.mean if mean is None else mean,
            dataset.info.std if std is None else std)


def _on_device(host: Iterator, device, prefetch: int, mean: Sequence[float],
               std: Sequence[float]) -> Iterator[Batch]:
    """Copies batches to the device `prefetch` ahead of the one yielded, then normalises."""
    if prefetch < 0:
        raise ValueError(f"data.prefetch={prefetch} must be >= 0")
    device = torch.device(device)
    # made once: a per-batch host->device copy of the statistics would be wasted
    mean = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    queue = deque()
    for batch in itertools.chain.from_iterable(host):  # each host item: a list of batches
        queue.append(_copy(batch, device, stream))
        if len(queue) > prefetch:
            yield _ready(queue.popleft(), mean, std, device)
    while queue:
        yield _ready(queue.popleft(), mean, std, device)


def _copy(batch: tuple[Tensor, ...], device: torch.device, stream):
    """Images and masks to the device; anything after them (sample indices) stays on the host."""
    pixels, rest = batch[:2], tuple(batch[2:])
    if stream is None:
        return tuple(t.to(device) for t in pixels) + rest, None
    with torch.cuda.stream(stream):   # the copy overlaps the compute of the steps before it
        moved = tuple(t.to(device, non_blocking=True) for t in pixels)
    return moved + rest, stream.record_event()


def _ready(copied, mean: Tensor, std: Tensor, device: torch.device) -> tuple:
    (images, masks, *rest), event = copied
    if event is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(event)
        for t in (images, masks):
            t.record_stream(current)   # freed memory is reused only after this stream is done
    return (normalize(images, mean, std), masks.long(), *rest)
