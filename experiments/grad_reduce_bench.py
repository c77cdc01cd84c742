"""Data-parallel gradient averaging: one all-reduce after the backward against all-reduces of
buckets that overlap the backward (seg.distributed.grad_reducer, train.grad_bucket_mb), on the
eager train step, two or more ranks:

  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 experiments/grad_reduce_bench.py \
      --base_channels=64 --out=overlap.json

CPU ranks talk over gloo, GPUs over NCCL. Timing: seg.bench.time_grad_reduce.
"""
from absl import flags

from configs import unet
from seg import bench, cli

_BASE = flags.DEFINE_integer("base_channels", 64, "UNet width (64: the paper's, 31M params).")
_SIZE = flags.DEFINE_integer("image_size", 64, "Square input size.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch of each rank.")
_BUCKET = flags.DEFINE_float("bucket_mb", 25.0, "Bucket size of the overlapped all-reduces.")
_ROUNDS = flags.DEFINE_integer("rounds", 12, "Round-robin rounds after one of warm-up.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per round and variant.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (rank 0; optional).")


def main(argv):
    del argv
    cfg = unet.get_config()
    cfg.model.update(base_channels=_BASE.value, dropout=0.0)
    cfg.optimizer.update(name="sgd", lr=0.01)
    bench.time_grad_reduce(cfg, batch_size=_BATCH.value, image_size=_SIZE.value,
                           bucket_mb=_BUCKET.value, rounds=_ROUNDS.value, steps=_STEPS.value,
                           out=_OUT.value)


if __name__ == "__main__":
    cli.run(main)
