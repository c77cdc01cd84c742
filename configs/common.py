"""Defaults shared by every experiment config. A config file overrides only what differs.

Field names here are a contract: experiments/*, report tools and users' notebooks read them.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # synthetic | folder | camvid | voc | pets | cityscapes | ade20k
    c.data.name = "synthetic"
    c.data.seed = 0                        # fixed while `seed` varies: a seed sweep sees the same data
    c.data.root = config_dict.placeholder(str)   # folder of a real dataset (not used by synthetic)
    # used when data.root is unset: the dataset is $SEG_DATASETS/<dirname> (seg/data/roots.py)
    c.data.dirname = ""
    c.data.num_classes = 3                 # background + two object classes
    c.data.ignore_index = 255
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.test_split = "test"             # "" = the dataset has none: no test eval
    c.data.test_optional = False           # a test split missing from the folder: skip, not error
    c.data.sbd_root = ""                   # voc: SBD folder whose train set is added ("aug")
    c.data.verify = False                  # check every file when the dataset is opened
    c.data.storage = "raw"                 # raw | memmap | hdf5 (caches of preprocessed samples)
    c.data.cache_dir = ""                  # where memmap / hdf5 caches are written
    c.data.normalize = "dataset"           # dataset (its own train mean/std) | imagenet
    # folder only: stored mask values -> classes (seg/data/labels.py); default: value = class
    c.data.reduce_zero_label = False       # 0 ignored, k -> class k - 1 (mmsegmentation's option)
    c.data.label_map = ()                  # ((stored value, class or ignore), ...); others refused
    # synthetic only
    c.data.image_size = 64
    c.data.num_train = 2000
    c.data.num_val = 200
    c.data.num_test = 200
    # train augmentation (image and mask together)
    c.data.resize = 0                      # shorter side resized to this first; 0 = off
    c.data.scale_range = (1.0, 1.0)        # random rescale, e.g. (0.5, 2.0)
    # (long, short): scale_range multiplies this box, and each image is resized, keeping its
    # aspect, to fit the box drawn (mmsegmentation's RandomResize); () = the image's own size
    c.data.scale_to = ()
    c.data.crop_size = ()                  # (H, W) random crop, padded with ignore; () = none
    # redraw the crop (at most 10 times) while one class covers this share or more of its
    # labelled pixels (mmsegmentation's RandomCrop cat_max_ratio); 1.0 = off
    c.data.crop_max_class_ratio = 1.0
    c.data.hflip = True
    c.data.color_jitter = 0.0              # brightness / contrast / saturation strength; 0 = off
    c.data.perspective = 0.0               # distortion scale of a random perspective; 0 = off
    c.data.photometric = False             # mmsegmentation's PhotoMetricDistortion
    # evaluation reads whole images, padded to a multiple of this (ignore in the mask)
    c.data.pad_multiple = 32
    # loading
    c.data.workers = 0                     # DataLoader worker processes
    c.data.prefetch = 2                    # batches moved to the device ahead of the step

    c.model = ml_collections.ConfigDict()
    c.model.name = ""
    # "" = random init; a torchvision weight name (IMAGENET1K_V1: read from the torch hub cache,
    # never downloaded) or a file path, loaded into the model's `backbone`.
    c.model.backbone_weights = ""
    # "" = none. Start from trained weights: a seg run directory (its newest checkpoint), a
    # checkpoint or exported weights file, or torchvision's segmentation weights by model name
    # (fcn_resnet50, deeplabv3_resnet50, ...: read from the torch hub cache, never downloaded).
    # Strict: every tensor must fit, except the classifier layers when the number of classes
    # differs, which keep their fresh init (named in the startup output).
    c.model.init_from = ""

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "cross_entropy"          # cross_entropy | focal | bce | bce_soft_iou | dice
    c.loss.gamma = 2.0                     # focal loss only
    c.loss.class_weights = ()              # empty: unweighted
    c.loss.class_balance = ""              # "median_frequency": weights measured on the train
                                           # split (SegNet's; seg/data/balance.py)
    c.loss.aux_weight = 0.0                # weight of the auxiliary head's loss, if any
    c.loss.ignore_index = c.data.get_ref("ignore_index")   # follows data.ignore_index overrides

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"               # sgd | adam | adamw
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 0.0            # > 0: clip the gradients' global 2-norm to this
    c.optimizer.fused = False              # torch's fused update kernels (eager only; see README)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "poly"               # constant | step | cosine | poly
    c.schedule.power = 0.9
    c.schedule.step_size = 1000            # step schedule only
    c.schedule.gamma = 0.1                 # step schedule only
    c.schedule.end_lr = 0.0
    c.schedule.warmup_steps = 0
    c.schedule.warmup_start_factor = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.eval_batch_size = 64
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    # val metric whose best weights are kept (checkpoints/best_<step>.pt, params and buffers
    # only): highest wins, lowest for a key containing "loss"; "" = keep none
    c.train.best_metric = "miou"
    c.train.freeze = ()                    # module paths whose params get no gradient, e.g. ("backbone",)
    c.train.compile = False                # torch.compile the steps
    c.train.precision = "fp32"             # fp32 | bf16 | fp16 (autocast forward; fp32 weights,
                                           # loss, metrics; fp16 with dynamic loss scaling)
    c.train.loss_scale = 65536.0           # fp16: the initial loss scale (GradScaler's)
    c.train.loss_scale_growth_interval = 2000   # fp16: clean steps before the scale doubles
    c.train.channels_last = False          # channels_last images and conv weights
    c.train.checkpoint_activations = False # recompute ResNet / UNet blocks in the backward (eager)
    c.train.grad_impl = "auto"             # auto | autograd | func (torch.func.grad_and_value)
    c.train.device = "auto"                # auto: cuda when available, else cpu
    # torchrun data parallel: train.batch_size and eval_batch_size are global (split over ranks)
    c.train.sync_bn = False                # BN moments over the global batch; False: per-rank
                                           # statistics, averaged before each eval / checkpoint
    c.train.grad_bucket_mb = 25.0          # eager steps: all-reduce buckets started during the
                                           # backward (DDP's size); 0: one all-reduce after it
    c.train.nonfinite = "stop"             # NaN/Inf loss: stop (exit naming the step) | skip
    # K > 1: seeds seed .. seed+K-1 trained together by one vmapped step (seg/seeds.py), each
    # an ordinary run in <workdir>/seed<s>/ equal to a separate run of its seed up to rounding
    c.train.num_seeds = 1
    c.train.deterministic = False          # torch.use_deterministic_algorithms + cuDNN/cuBLAS
    c.train.num_pictures = 4               # val images drawn at each eval (predictions/); 0 = off
    c.train.tensorboard = False            # also log to <workdir>/tensorboard (needs tensorboard)

    # how evals (in training and experiments/evaluate.py) run the model over an image
    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "whole"                  # whole | slide (overlapping windows, averaged)
    # (long, short): each image resized, keeping its aspect, to fit this box for the forward, the
    # logits resized back to it (mmsegmentation's test Resize keep_ratio); () = off. With
    # data.pad_multiple=1 the image itself is fitted (padding would count in its size)
    c.eval.scale_to = ()
    c.eval.window = (512, 512)             # slide: window (H, W); shrinks to a smaller image
    c.eval.stride = (341, 341)             # slide: step between windows, at most the window
    c.eval.flip = False                    # test-time augmentation: average with the mirror image
    c.eval.scales = (1.0,)                 # test-time augmentation: e.g. (0.75, 1.0, 1.25)
    c.eval.per_image = True                # save each image's counts (<workdir>/per_image/)
                                           # for paired comparisons (seg/compare.py)
    return c
