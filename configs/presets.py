"""Dataset presets: `--config=configs/<model>.py:<preset>` trains that model on a real dataset.

Every model config ends with `return presets.apply(c, arg)`. A preset sets the data fields
(reader, root, classes, splits, normalisation, train augmentation, workers) and the batch sizes
and eval interval that suit the dataset's size; any of them can still be overridden from flags.
camvid, membrane and bagdata read the staged copies in <repo>/../shared/datasets; voc and pets
leave data.root unset, so that a run without --config.data.root stops with an error naming it.
The binary sets (membrane, bagdata) stay 2-class softmax with cross-entropy.
"""
from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


def _camvid(c):
    _data(c, name="camvid", root=str(SHARED / "camvid"), num_classes=11, test_split="",
          normalize="dataset", scale_range=(0.5, 2.0), crop_size=(352, 480), workers=4)
    _train(c, batch_size=8, eval_batch_size=8, eval_every=200)   # 367 train images, 46 steps/epoch


def _membrane(c):
    # 20 train slices of 512x512: many random 256 crops and flips per slice
    _data(c, name="folder", root=str(SHARED / "membrane"), num_classes=2, normalize="dataset",
          crop_size=(256, 256), workers=2)
    _train(c, batch_size=4, eval_batch_size=5, eval_every=100)


def _bagdata(c):
    _data(c, name="folder", root=str(SHARED / "bagdata"), num_classes=2, normalize="dataset",
          scale_range=(0.75, 1.5), crop_size=(224, 224), workers=2)
    _train(c, batch_size=16, eval_batch_size=40, eval_every=100)   # 373 train images


def _voc(c):
    _data(c, name="voc", num_classes=21, test_split="", normalize="imagenet",
          scale_range=(0.5, 2.0), crop_size=(512, 512), workers=4)   # the VOC recipe of FCN / DeepLab
    _train(c, batch_size=8, eval_batch_size=8, eval_every=1000)   # 1464 train (10582 with SBD)


def _pets(c):
    # the three-class Pet recipe: shorter side 256, then a 224 crop, flips, colour jitter and perspective
    _data(c, name="pets", num_classes=3, normalize="imagenet", resize=256, crop_size=(224, 224),
          color_jitter=0.4, perspective=0.25, workers=4)
    _train(c, batch_size=16, eval_batch_size=32, eval_every=500)   # 2944 train images


PRESETS = {"camvid": _camvid, "membrane": _membrane, "bagdata": _bagdata, "voc": _voc,
           "pets": _pets}


def apply(config, name: str | None):
    """Applies preset `name` to `config` in place and returns it; None or "" changes nothing."""
    if not name:
        return config
    if name not in PRESETS:
        raise ValueError(f"unknown dataset preset {name!r} (--config=<file>.py:<preset>); "
                         f"valid: {', '.join(PRESETS)}")
    PRESETS[name](config)
    return config


def _data(c, **fields):
    c.data.ignore_index = 255
    c.data.hflip = True
    c.data.update(fields)


def _train(c, eval_every: int, **fields):
    c.train.update(fields)
    c.train.eval_every = c.train.checkpoint_every = eval_every
