"""Segments new images with a trained run: a palette PNG mask per image, an overlay picture,
optionally the class probabilities, and predictions.json with each image's class areas.

  python experiments/predict.py --workdir=runs/psp photos/ 'more/*.jpg' --out=runs/psp/predict
  python experiments/predict.py --workdir=runs/psp img.png --out=out --checkpoint=best --flip

Inputs are image files, folders (their image files) and globs. The model, its eval forward
(precision, whole / sliding-window inference, TTA) and the classes, palette and normalisation
come from the run directory; each eval flag overrides one setting. A bad input is named in one
line and skipped; the others are still written, and the exit status is 1.
"""
from absl import flags

from configs import common
from seg import cli, inference, predict

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's directory.")
_OUT = flags.DEFINE_string("out", None, "Folder for the outputs (created).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "last", "last: the newest readable checkpoint; "
                                  "best: the weights of the best val eval; or a file.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images read and run on the device at a time.")
_WORKERS = flags.DEFINE_integer("workers", 0, "DataLoader processes reading the images.")
_OVERLAY = flags.DEFINE_bool("overlay", True, "Write <name>_overlay.png: image | overlay.")
_PROBS = flags.DEFINE_bool("probs", False, "Write <name>_probs.npy: float32 (classes, H, W).")
_MODE = flags.DEFINE_enum("mode", None, list(inference.MODES), "eval.mode: whole or slide.")
_WINDOW = flags.DEFINE_list("window", None, "eval.window: H,W of the sliding window.")
_STRIDE = flags.DEFINE_list("stride", None, "eval.stride: h,w between sliding windows.")
_FLIP = flags.DEFINE_bool("flip", None, "eval.flip: average with the mirrored image.")
_SCALES = flags.DEFINE_list("scales", None, "eval.scales, e.g. 0.75,1,1.25.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    predict.predict_run(
        _WORKDIR.value, argv[1:], _OUT.value, _CHECKPOINT.value, _BATCH.value, _WORKERS.value,
        _OVERLAY.value, _PROBS.value, defaults=common.get_base_config(), mode=_MODE.value,
        window=_WINDOW.value, stride=_STRIDE.value, flip=_FLIP.value, scales=_SCALES.value)


if __name__ == "__main__":
    cli.run(main)
