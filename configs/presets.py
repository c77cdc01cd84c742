"""Dataset presets: `--config=configs/<model>.py:<preset>` trains that model on a real dataset.

Every model config ends with `return presets.apply(c, arg)`. A preset sets the data fields
(reader, folder name, classes, splits, normalisation, train augmentation, workers) and the batch
sizes and eval interval that suit the dataset; any of them can still be overridden from flags.
A preset never says where the data is: the dataset is read from --config.data.root or, when
that is unset, from $SEG_DATASETS/<data.dirname>, resolved when the data is opened
(seg/data/roots.py). The binary sets (membrane, bagdata) stay 2-class softmax with
cross-entropy.

cityscapes, ade20k and voc are the published recipes of mmsegmentation's R50-D8 models
(configs/_base_/datasets/{cityscapes,ade20k,pascal_voc12_aug}.py, schedules/schedule_{40k,80k,
20k}.py and models/{pspnet,deeplabv3,fcn}_r50-d8.py, mmsegmentation 1.2.2): they also set the
optimizer, schedule, auxiliary weight, steps and eval mode. They touch no config.model field,
so they apply to every model; the backbone and its pretrained weights are flags (README).
"""
from __future__ import annotations


def _camvid(c):
    # SegNet's split has a test set (233 images); the shared copy withholds it, so the test
    # split is evaluated when the folder has one
    _data(c, name="camvid", dirname="camvid", num_classes=11, test_split="test",
          test_optional=True, normalize="dataset", scale_range=(0.5, 2.0),
          crop_size=(352, 480), workers=4)
    _train(c, batch_size=8, eval_batch_size=8, eval_every=200)   # 367 train images, 46 steps/epoch
    # from scratch on 367 images: SegNet's median-frequency class weights, measured on the
    # train split (seg/data/balance.py); the evidence for each choice is in the README
    c.loss.class_balance = "median_frequency"


def _camvid_cpu(c):
    # the camvid recipe at half resolution (every image fitted to 240x180, train and eval; the
    # logits are resized back, so the metrics count the labels at 480x360), in bf16 with
    # channels_last, the fast path on a 2-core CPU (README): about 30 minutes for PSPNet-R18
    _camvid(c)
    c.data.update(scale_to=(240, 180), crop_size=(176, 240), pad_multiple=1, workers=2)
    c.eval.scale_to = (240, 180)
    c.train.update(precision="bf16", channels_last=True, steps=2400, log_every=100)
    c.train.eval_every = c.train.checkpoint_every = 300


def _membrane(c):
    # 20 train slices of 512x512: many random 256 crops and flips per slice
    _data(c, name="folder", dirname="membrane", num_classes=2, normalize="dataset",
          crop_size=(256, 256), workers=2)
    _train(c, batch_size=4, eval_batch_size=5, eval_every=100)


def _bagdata(c):
    _data(c, name="folder", dirname="bagdata", num_classes=2, normalize="dataset",
          scale_range=(0.75, 1.5), crop_size=(224, 224), workers=2)
    _train(c, batch_size=16, eval_batch_size=40, eval_every=100)   # 373 train images


def _pets(c):
    # the three-class Pet recipe: shorter side 256, then a 224 crop, flips, colour jitter and perspective
    _data(c, name="pets", dirname="oxford-iiit-pet", num_classes=3, normalize="imagenet",
          resize=256, crop_size=(224, 224), color_jitter=0.4, perspective=0.25, workers=4)
    _train(c, batch_size=16, eval_batch_size=32, eval_every=500)   # 2944 train images


def _cityscapes(c):
    # 2975 train images of 2048x1024; mmsegmentation: 4 GPUs x 2 images, 40k iterations
    _data(c, name="cityscapes", dirname="cityscapes", num_classes=19, test_split="")
    # one 2048x1024 sample costs ~0.15 s of a CPU core to read and augment (README): 8 workers
    _mmseg_recipe(c, box=(2048, 1024), crop=(512, 1024), batch_size=8, steps=40_000,
                  eval_every=4000, eval_batch_size=8, workers=8)


def _ade20k(c):
    # 20210 training images of ~512 pixels a side; mmsegmentation: 4 GPUs x 4, 80k iterations
    _data(c, name="ade20k", dirname="ADEChallengeData2016", num_classes=150,
          train_split="training", val_split="validation", test_split="")
    _mmseg_recipe(c, box=(2048, 512), crop=(512, 512), batch_size=16, steps=80_000,
                  eval_every=8000, eval_batch_size=16, workers=4)


def _voc(c):
    # 1464 train images, 10582 with --config.data.sbd_root (the "aug" set); 4 GPUs x 4, 20k
    _data(c, name="voc", dirname="VOCdevkit", num_classes=21, test_split="")
    _mmseg_recipe(c, box=(2048, 512), crop=(512, 512), batch_size=16, steps=20_000,
                  eval_every=2000, eval_batch_size=16, workers=4)


def _mmseg_recipe(c, box, crop, batch_size, steps, eval_every, eval_batch_size, workers):
    """mmsegmentation's R50-D8 recipe for one dataset: the box of its RandomResize and its test
    Resize (keep_ratio), the crop, the global batch and the iterations."""
    c.data.update(normalize="imagenet", scale_range=(0.5, 2.0), scale_to=box, crop_size=crop,
                  crop_max_class_ratio=0.75, photometric=True, workers=workers,
                  pad_multiple=1)   # whole-image eval on the unpadded image, as the reference
    c.eval.update(mode="whole", scale_to=box, flip=False, scales=(1.0,))
    c.loss.update(name="cross_entropy", class_weights=(), aux_weight=0.4)
    c.optimizer.update(name="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4)
    c.schedule.update(name="poly", power=0.9, end_lr=1e-4, warmup_steps=0)   # PolyLR eta_min
    # the reference's BatchNorm is SyncBN over its 4 GPUs: with torchrun, sync over the ranks
    _train(c, steps=steps, batch_size=batch_size, eval_batch_size=eval_batch_size,
           eval_every=eval_every, log_every=50, sync_bn=True)


PRESETS = {"camvid": _camvid, "camvid_cpu": _camvid_cpu, "membrane": _membrane,
           "bagdata": _bagdata, "voc": _voc,
           "pets": _pets, "cityscapes": _cityscapes, "ade20k": _ade20k}
RECIPES = ("cityscapes", "ade20k", "voc")   # presets that also set the training recipe


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
