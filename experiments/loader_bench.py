"""Input-pipeline benchmark: images/s of seg.data.batches.train_batches alone (no model).

  python experiments/loader_bench.py                      # CamVid 360x480, full train augmentation
  python experiments/loader_bench.py --config=configs/pspnet.py --out=loader.json
  python experiments/loader_bench.py --config=configs/unet.py:camvid --workers=0,2,4
  python experiments/loader_bench.py --config=configs/pspnet.py:camvid --num_seeds=1,2,4,8 \
      --config.data.crop_size="(176,240)" --workers=0

Without --config it times the CamVid preset (at --root, default $SEG_DATASETS/camvid) at full
360x480 crops with its scale 0.5-2.0 and flips, plus colour jitter 0.4. For each worker count it times
--steps batches after --warmup untimed ones (worker start-up, page cache), reading, decoding,
augmenting, collating, copying to --device and normalising. Prints a table and writes JSON.
--num_seeds times the batches of K members of a train.num_seeds run (each its own order and
augmentation: seg.data.batches.member_batches), K x batch images a step.
"""
from __future__ import annotations

import os
import time


import torch
from absl import app, flags
from ml_collections import config_flags

from configs import common, presets
from seg import data, rundir
from seg.data import batches, augment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file; default: CamVid (above).")
_ROOT = flags.DEFINE_string("root", None,
                            "CamVid folder (no --config); default: $SEG_DATASETS/camvid.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "DataLoader worker counts to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed batches per worker count.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
_SEEDS = flags.DEFINE_list("num_seeds", ["1"], "Members K of a train.num_seeds run to time.")
_DEVICE = flags.DEFINE_string("device", "cpu", "Where batches are delivered (cpu, cuda).")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")


def camvid_config(root: str | None):
    """The CamVid preset at full resolution with the whole train augmentation."""
    c = presets.apply(common.get_base_config(), "camvid")
    if root:
        c.data.root = root
    c.data.crop_size = (360, 480)
    c.data.color_jitter = 0.4
    return c


def images_per_s(dataset, transform, cfg, workers: int, device: torch.device, k: int) -> float:
    seeds = [cfg.seed + s for s in range(k)]
    stream = batches.member_batches(dataset, transform, cfg.train.batch_size, seeds,
                                    device=device, workers=workers, prefetch=cfg.data.prefetch)
    for _ in range(_WARMUP.value):
        next(stream)
    sync(device)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        next(stream)
    sync(device)
    return _STEPS.value * k * cfg.train.batch_size / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv):
    del argv
    cfg = _CONFIG.value if _CONFIG.value is not None else camvid_config(_ROOT.value)
    device = torch.device(_DEVICE.value)
    dataset = data.build(cfg.data, "train")
    transform = augment.train_transform(cfg.data, dataset.info)
    image, _ = dataset.read(0)
    print(f"{cfg.data.name}: {len(dataset)} train images, first {tuple(image.shape[1:])}, "
          f"batch {cfg.train.batch_size}, {os.cpu_count()} CPUs\n{transform}")
    rows = []
    print("| workers | members K | images/s | seconds per step |\n|---|---|---|---|")
    for workers in map(int, _WORKERS.value):
        for k in map(int, _SEEDS.value):
            rate = images_per_s(dataset, transform, cfg, workers, device, k)
            step = k * cfg.train.batch_size / rate
            rows.append({"workers": workers, "num_seeds": k, "images_per_s": rate,
                         "seconds_per_step": step})
            print(f"| {workers} | {k} | {rate:.1f} | {step:.3f} |", flush=True)
    if _OUT.value:
        rundir.write_json(_OUT.value, {
            "data": cfg.data.to_dict(), "batch_size": cfg.train.batch_size,
            "steps": _STEPS.value, "warmup": _WARMUP.value, "device": str(device),
            "cpus": os.cpu_count(), "torch": torch.__version__, "results": rows})


if __name__ == "__main__":
    app.run(main)
