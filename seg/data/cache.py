"""Preprocessed caches of a split, memmap or hdf5: a read is a slice instead of a decode.

A cache holds every sample of a split after a deterministic preprocessing, as one uint8 array of
images (N, 3, H, W) and one of masks (N, H, W), so a read is a slice instead of a decode:
  data.resize == 0  samples at their native size; every sample of the split must share it
  data.resize > 0   shorter side resized to data.resize (bilinear + antialias for images,
                    nearest for masks), then the centre (resize, resize) crop.
                    Training then crops within that square and evaluation sees the centre crop,
                    unlike data.storage=raw, which keeps the whole (resized) image.
Layout under data.cache_dir, named by dataset, split and a digest of the key (dataset, root,
split, preprocessing, classes, label map):
  memmap  <name>-<split>-<digest>.memmap/{images.npy, masks.npy, meta.json}   (numpy only)
  hdf5    <name>-<split>-<digest>.h5, datasets images / masks, attribute meta  (needs h5py)
A cache is written under a temporary name and renamed into place, with its meta written last;
the meta records the key and a fingerprint (path, size, mtime of every source file), and a cache
whose meta is missing or different (partial write, changed files) is rebuilt, never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from seg.data import roots
from seg.data.dataset import SegDataset
from seg.data.files import DataError, PairedFiles

VERSION = 1


def fixed_size(image: Tensor, mask: Tensor, resize: int) -> tuple[Tensor, Tensor]:
    """The deterministic preprocessing of a cache (see the module doc)."""
    if resize <= 0:
        return image, mask
    image = TF.center_crop(TF.resize(image, [resize], antialias=True), [resize, resize])
    mask = TF.resize(mask[None], [resize], interpolation=InterpolationMode.NEAREST)
    return image, TF.center_crop(mask, [resize, resize])[0]


class _Memmap:
    suffix = ".memmap"

    @staticmethod
    def create(path: str, n: int, h: int, w: int):
        os.makedirs(path)
        new = np.lib.format.open_memmap
        return (new(os.path.join(path, "images.npy"), "w+", np.uint8, (n, 3, h, w)),
                new(os.path.join(path, "masks.npy"), "w+", np.uint8, (n, h, w)))

    @staticmethod
    def close(arrays) -> None:
        for a in arrays:
            a.flush()

    @staticmethod
    def write_meta(path: str, meta: dict) -> None:
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)

    @staticmethod
    def read_meta(path: str) -> dict | None:
        try:
            with open(os.path.join(path, "meta.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    @staticmethod
    def open(path: str):
        return tuple(np.load(os.path.join(path, f), mmap_mode="r")
                     for f in ("images.npy", "masks.npy"))


class _Hdf5:
    suffix = ".h5"

    @staticmethod
    def create(path: str, n: int, h: int, w: int):
        f = _h5py().File(path, "w")
        # one chunk per sample: a read touches exactly one image and one mask
        return (f.create_dataset("images", (n, 3, h, w), np.uint8, chunks=(1, 3, h, w)),
                f.create_dataset("masks", (n, h, w), np.uint8, chunks=(1, h, w)))

    @staticmethod
    def close(arrays) -> None:
        arrays[0].file.close()

    @staticmethod
    def write_meta(path: str, meta: dict) -> None:
        with _h5py().File(path, "a") as f:
            f.attrs["meta"] = json.dumps(meta)

    @staticmethod
    def read_meta(path: str) -> dict | None:
        try:
            with _h5py().File(path, "r") as f:
                return json.loads(f.attrs["meta"])
        except (OSError, KeyError, ValueError):
            return None

    @staticmethod
    def open(path: str):
        f = _h5py().File(path, "r")
        return f["images"], f["masks"]


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("data.storage='hdf5' needs h5py, an optional dependency: pip install h5py "
                        "(or use data.storage='memmap')") from None
    return h5py


FORMATS = {"memmap": _Memmap, "hdf5": _Hdf5}


class CachedSplit(SegDataset):
    """A split read from a cache; opened lazily in each process (DataLoader workers)."""

    def __init__(self, fmt, path: str, raw: SegDataset):
        self.info, self.path, self._fmt, self._raw = raw.info, path, fmt, raw
        self._len = len(raw)
        self._arrays, self._pid = None, None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict:
        # open handles are per process: a pickled memmap would copy the whole array
        return {**self.__dict__, "_arrays": None, "_pid": None}

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        if self._pid != os.getpid():
            self._arrays, self._pid = self._fmt.open(self.path), os.getpid()
        images, masks = self._arrays
        return torch.from_numpy(np.array(images[i])), torch.from_numpy(np.array(masks[i]))

    def source(self, i: int) -> str:
        return f"{self.path}[{i}] (from {self._raw.source(i)})"


def cached(raw: PairedFiles, data_cfg, split: str) -> SegDataset:
    """`raw` itself for data.storage='raw', else its cache, built first if missing or stale."""
    if data_cfg.storage == "raw":
        return raw
    if data_cfg.storage not in FORMATS:
        raise DataError(f"data.storage={data_cfg.storage!r} is not one of "
                        f"{('raw', *FORMATS)}")
    fmt = FORMATS[data_cfg.storage]
    if fmt is _Hdf5:
        _h5py()
    if not data_cfg.cache_dir:
        raise DataError(f"data.storage={data_cfg.storage!r} needs data.cache_dir, a folder "
                        f"where the cache is written")
    key = dict(version=VERSION, name=data_cfg.name,
               root=os.path.abspath(roots.dataset_root(data_cfg)),
               sbd_root=data_cfg.sbd_root, split=split, resize=data_cfg.resize,
               reduce_zero_label=data_cfg.get("reduce_zero_label", False),
               label_map=[list(p) for p in data_cfg.get("label_map", ())],
               classes=list(raw.info.class_names), ignore_index=raw.info.ignore_index)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(data_cfg.cache_dir, f"{raw.info.name}-{split}-{digest}{fmt.suffix}")
    expected = dict(key=key, count=len(raw), fingerprint=fingerprint(raw.pairs))
    if not _is_current(fmt, path, expected):
        _build(fmt, path, raw, data_cfg.resize, expected)
    return CachedSplit(fmt, path, raw)


def fingerprint(pairs) -> str:
    """Digest of every source file's path, size and modification time, in sample order."""
    h = hashlib.sha256()
    for pair in pairs:
        for path in pair:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _is_current(fmt, path: str, expected: dict) -> bool:
    meta = fmt.read_meta(path) if os.path.exists(path) else None
    return meta is not None and all(meta.get(k) == v for k, v in expected.items())


def _build(fmt, path: str, raw: SegDataset, resize: int, meta: dict) -> None:
    if len(raw) == 0:
        raise DataError(f"cannot cache an empty split ({path})")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    _remove(tmp)
    first = fixed_size(*raw.read(0), resize)
    h, w = first[1].shape
    arrays = fmt.create(tmp, len(raw), h, w)
    try:
        for i in range(len(raw)):
            image, mask = first if i == 0 else fixed_size(*raw.read(i), resize)
            if mask.shape != (h, w):
                raise DataError(
                    f"{raw.source(i)} is {tuple(mask.shape)} after preprocessing but "
                    f"{raw.source(0)} is {(h, w)}: a cache needs one size per split: set "
                    f"data.resize (caches centre crops) or data.storage='raw'")
            arrays[0][i], arrays[1][i] = image.numpy(), mask.numpy()
    except BaseException:
        fmt.close(arrays)
        _remove(tmp)
        raise
    fmt.close(arrays)
    fmt.write_meta(tmp, meta | {"image_hw": [h, w]})
    _publish(fmt, tmp, path, meta)


def _publish(fmt, tmp: str, path: str, meta: dict) -> None:
    if _is_current(fmt, path, meta):   # another process (a second rank) was faster
        _remove(tmp)
        return
    if os.path.isdir(path):   # a stale memmap folder; a file is replaced atomically
        shutil.rmtree(path)
    try:
        os.replace(tmp, path)
    except OSError:   # lost the race between the check and the rename
        _remove(tmp)
        if not _is_current(fmt, path, meta):
            raise


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
