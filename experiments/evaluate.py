"""Evaluates a trained run on one split, with whole-image or sliding-window inference and
optional test-time augmentation, and writes <workdir>/eval_<split>[_<tag>].json.

  python experiments/evaluate.py runs/psp --split=test
  python experiments/evaluate.py runs/psp --split=test --mode=slide --window=48,48 --stride=32,32
  python experiments/evaluate.py runs/psp --split=val --flip --scales=0.75,1,1.25 --tag=tta
  python experiments/evaluate.py runs/psp --checkpoint=runs/psp/checkpoints/ckpt_00000500.pt
  python experiments/evaluate.py runs/psp --split=test --checkpoint=best

The model, data, precision and eval settings come from the run's config.json; each flag
overrides one setting. The record holds the metrics, the confusion matrix, the eval settings
and the checkpoint's step; a per-class table is printed.
"""
from absl import app, flags

from configs import common
from seg import cli, evaluation, inference

_SPLIT = flags.DEFINE_enum("split", "val", ["train", "val", "test"], "The split to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "last", "last: the newest readable checkpoint; "
                                  "best: the weights of the best val eval (train.best_metric); "
                                  "or a checkpoint file.")
_TAG = flags.DEFINE_string("tag", "", "Names the record eval_<split>_<tag>.json.")
_MODE = flags.DEFINE_enum("mode", None, list(inference.MODES), "eval.mode: whole or slide.")
_WINDOW = flags.DEFINE_list("window", None, "eval.window: H,W of the sliding window.")
_STRIDE = flags.DEFINE_list("stride", None, "eval.stride: h,w between sliding windows.")
_FLIP = flags.DEFINE_bool("flip", None, "eval.flip: average with the mirrored image.")
_SCALES = flags.DEFINE_list("scales", None, "eval.scales, e.g. 0.75,1,1.25.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per eval batch (default: the run's "
                              "train.eval_batch_size); the numbers do not depend on it.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: evaluate.py <workdir> [--split=val|test] [flags]")
    record = evaluation.evaluate_run(
        argv[1], _SPLIT.value, _CHECKPOINT.value, _TAG.value, _BATCH.value,
        defaults=common.get_base_config(), mode=_MODE.value, window=_WINDOW.value,
        stride=_STRIDE.value, flip=_FLIP.value, scales=_SCALES.value)
    print(evaluation.report(argv[1], record, _TAG.value))


if __name__ == "__main__":
    cli.run(main)
