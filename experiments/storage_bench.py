"""Read throughput of the storage options (are caches worth it?).

  python experiments/storage_bench.py --dataset=camvid --split=train --out=cache.json

For raw files, a memmap cache and an hdf5 cache (reported unavailable without h5py) of one split,
it times `read(i)` (decode or slice, with the reader's checks: the sample a DataLoader worker
gets before augmentation) over the first --num samples, in file order and in a fixed shuffled
order, --rounds times interleaved, after one untimed warm-up pass. Every pass therefore reads
from the OS page cache: this measures decoding and copying, not the disk. Reports the median
images/s, the time to build each cache and its size on disk next to the source files'.
Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


import torch
from absl import app, flags

from configs import common, presets
from seg import data, rundir

_DATASET = flags.DEFINE_enum("dataset", "camvid", list(presets.PRESETS), "Dataset preset.")
_ROOT = flags.DEFINE_string("root", None,
                            "data.root (default: $SEG_DATASETS/<the preset's data.dirname>).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "val", "test"], "Split to read.")
_NUM = flags.DEFINE_integer("num", 0, "Samples read per pass (0 = the whole split).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (each: one sequential and one shuffled "
                                            "pass per storage).")
_RESIZE = flags.DEFINE_integer("resize", 0, "data.resize of the caches (0 = native size).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Where caches go (default: a temporary folder, "
                                                "removed afterwards).")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")

STORAGES = ("raw", "memmap", "hdf5")


def open_storage(data_cfg, storage: str):
    """(dataset, build seconds) or (None, reason) when the storage cannot be used here."""
    data_cfg.storage = storage
    start = time.perf_counter()
    try:
        ds = data.build(data_cfg, _SPLIT.value)
    except data.DataError as e:
        if storage != "hdf5":
            raise
        return None, str(e)
    return ds, time.perf_counter() - start


def timed_pass(ds, order) -> float:
    start = time.perf_counter()
    for i in order:
        ds.read(i)
    return len(order) / (time.perf_counter() - start)


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv):
    del argv
    cfg = presets.apply(common.get_base_config(), _DATASET.value)
    if _ROOT.value:
        cfg.data.root = _ROOT.value
    cache_dir = _CACHE.value or tempfile.mkdtemp(prefix="seg-storage-bench-")
    cfg.data.cache_dir, cfg.data.resize = cache_dir, _RESIZE.value
    try:
        rows = measure(cfg.data)
    finally:
        if not _CACHE.value:
            shutil.rmtree(cache_dir)
    print(f"{_DATASET.value} {_SPLIT.value}: {rows[0]['num']} samples per pass, median of "
          f"{_ROUNDS.value} rounds, {torch.get_num_threads()} torch threads\n"
          "| storage | sequential img/s | shuffled img/s | build s | on disk MB |\n"
          "|---|---|---|---|---|")
    for r in rows:
        if "unavailable" in r:
            print(f"| {r['storage']} | unavailable: {r['unavailable']} | | | |")
        else:
            print(f"| {r['storage']} | {r['sequential']:.0f} | {r['shuffled']:.0f} | "
                  f"{r['build_s']:.1f} | {r['disk_mb']:.1f} |")
    if _OUT.value:
        rundir.write_json(_OUT.value, {"dataset": _DATASET.value, "root": cfg.data.root,
                                        "split": _SPLIT.value, "resize": _RESIZE.value,
                                        "rounds": _ROUNDS.value, "rows": rows})


def measure(data_cfg) -> list[dict]:
    opened, rows = {}, []
    for storage in STORAGES:
        ds, build = open_storage(data_cfg, storage)
        if ds is None:
            rows.append({"storage": storage, "unavailable": build})
            continue
        n = min(_NUM.value or len(ds), len(ds))
        source = [p for pair in ds.pairs for p in pair] if storage == "raw" else [ds.path]
        opened[storage] = ds
        rows.append({"storage": storage, "num": n, "build_s": 0.0 if storage == "raw" else build,
                     "disk_mb": sum(map(disk_bytes, source)) / 2**20})
    n = rows[0]["num"]
    orders = {"sequential": list(range(n)),
              "shuffled": torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()}
    for ds in opened.values():
        timed_pass(ds, orders["sequential"])   # warm-up: files in the page cache, caches opened
    speeds = {(s, o): [] for s in opened for o in orders}
    for _ in range(_ROUNDS.value):
        for storage, ds in opened.items():
            for order, index in orders.items():
                speeds[storage, order].append(timed_pass(ds, index))
    for r in rows:
        if r["storage"] in opened:
            r.update({o: statistics.median(speeds[r["storage"], o]) for o in orders})
    return rows


if __name__ == "__main__":
    app.run(main)
