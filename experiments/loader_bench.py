"""Input-pipeline benchmark: images/s of seg.data.batches.train_batches alone (no model).

  python experiments/loader_bench.py                      # CamVid 360x480, full train augmentation
  python experiments/loader_bench.py --config=configs/pspnet.py --out=loader.json
  python experiments/loader_bench.py --config=configs/unet.py:camvid --workers=0,2,4

Without --config it times the CamVid preset (at --root, default $SEG_DATASETS/camvid) at full
360x480 crops with its scale 0.5-2.0 and flips, plus colour jitter 0.4 (configs/benchmarks.py).
For each worker count it times --steps batches after --warmup untimed ones (worker start-up, page
cache), reading, decoding, augmenting, collating, copying to --device and normalising
(seg.bench.loader_rates). Prints a table and writes JSON. --num_seeds=1,2,4 times the batches of
K members of a train.num_seeds run (seg.data.batches.member_batches), K x batch images a step.
"""
from __future__ import annotations

import torch
from absl import flags
from ml_collections import config_flags

from configs import benchmarks
from seg import bench, cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file; default: CamVid (above).")
_ROOT = flags.DEFINE_string("root", None,
                            "CamVid folder (no --config); default: $SEG_DATASETS/camvid.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "DataLoader worker counts to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed batches per worker count.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
_DEVICE = flags.DEFINE_string("device", "cpu", "Where batches are delivered (cpu, cuda).")
_SEEDS = flags.DEFINE_list("num_seeds", ["1"], "Members K of a train.num_seeds run: K batches "
                           "a step, each its own order and augmentation.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")


def main(argv):
    del argv
    cfg = _CONFIG.value if _CONFIG.value is not None else benchmarks.camvid(_ROOT.value)
    bench.run_loader(cfg.data, cfg.train.batch_size, cfg.seed, [int(w) for w in _WORKERS.value],
                     steps=_STEPS.value, warmup=_WARMUP.value, device=torch.device(_DEVICE.value),
                     prefetch=cfg.data.prefetch, num_seeds=[int(k) for k in _SEEDS.value],
                     out=_OUT.value)


if __name__ == "__main__":
    cli.run(main)
