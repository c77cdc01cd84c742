"""Trains a segmentation model from a config into a run directory (seg/rundir.py).

  python experiments/train.py --config=configs/pspnet.py --workdir=runs/psp
  python experiments/train.py --config=configs/unet.py:membrane --workdir=runs/unet \
      --config.train.steps=200

Any config field can be overridden with --config.<field>=<value>. Restarting with the same
--workdir resumes from the newest readable checkpoint and ends with the numbers of an
uninterrupted run. Data parallel over N processes (GPUs, or CPU on gloo):

  torchrun --nproc_per_node=N experiments/train.py --config=... --workdir=...

train.batch_size and train.eval_batch_size are then global; rank 0 alone writes and prints.
The loop itself is seg.loop.train_and_evaluate, which notebooks and sweeps call directly.
"""
from absl import app, flags
from ml_collections import config_flags

from seg import cli, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file, configs/<name>.py "
                                          "(optionally :<dataset preset>).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: created, or resumed if it holds "
                               "a run of the same config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
