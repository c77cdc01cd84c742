"""The process and its machine: the device of a rank, the environment a run reports, and
process-level settings that a run opts into at start-up."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from typing import Iterator

import torch
import torchvision

from seg.distributed import WorldInfo

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters, glibc's malloc.h


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Tells glibc's malloc to reuse freed blocks up to `limit` bytes instead of handing them
    back to the kernel.

    By default glibc serves big allocations with fresh mmap pages and trims freed memory, with
    thresholds that drift with the allocation history. A training step frees and re-allocates
    the same large tensors every step, so the kernel faults the same pages in again: measured
    on UNet's Adam update, 18-42k page faults and 2-3x the arithmetic's time, for torch.optim
    as much as for ours. Returns False where the C library is not glibc (then nothing changes).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """torch.use_deterministic_algorithms, cuDNN's deterministic kernels without autotuning, and
    the cuBLAS workspace setting that deterministic cuBLAS needs, for the duration; the previous
    settings come back afterwards. Enter it before the first CUDA matmul: cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it creates its handle. enabled=False changes nothing.

    warn_only: an op with no deterministic CUDA kernel (the backward of bilinear upsampling,
    which PSPNet / DeepLabV3 use) warns instead of stopping the run."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
             cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool = True) -> Iterator[None]:
    """torch.backends.cudnn.benchmark for the duration: cuDNN times its convolution algorithms
    on the first call of each input shape and keeps the fastest. Training shapes are fixed
    (one crop size), so the search is paid once per shape; eval images of many sizes (VOC)
    pay it once per padded size. Runs that ask for train.deterministic keep it off
    (`deterministic_algorithms` turns it off): the fastest algorithm can differ between runs.
    enabled=False changes nothing; the previous setting comes back afterwards."""
    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def select_device(name: str, info: WorldInfo) -> torch.device:
    """train.device of this rank: "auto" is CUDA when available, else CPU; with torchrun,
    "cuda" is GPU number LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    if name.startswith("cuda:") and info.world_size > 1:
        raise ValueError(f"train.device={name!r} names one GPU for {info.world_size} ranks; "
                         "use 'cuda' or 'auto' (each rank takes GPU LOCAL_RANK)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N)"
                         ) from None


def device_name(device: torch.device) -> str:
    """"cuda:0 (NVIDIA H200)", "cpu (8 threads)": what a startup line shows."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'' if threads == 1 else 's'})"


def environment(device: torch.device, world_size: int = 1) -> dict:
    """Versions and hardware, for the run's summary."""
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "world_size": world_size}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
