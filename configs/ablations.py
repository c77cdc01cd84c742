"""The ablation studies: each a function (preset, **options) -> {variant name: config}, run by
experiments/ablate.py (every variant with every seed, seg/sweep.py) and compared by its summary.

  loss       cross-entropy against focal loss with gamma 0.5, 1 and 2 (Lin et al. 2017) on any
             model (--model): does down-weighting confident pixels help the small classes
             against a dominant background? Focal with gamma 0 is the cross-entropy exactly.
  fcn_skips  FCN-32s against 16s against 8s (Long et al. 2015): how much the pool4 and pool3
             skips add; the three configs differ only in the skips and the final upsampling.
  pspnet     PSPNet's choices one at a time (Zhao et al. 2017): bins {1} against {1, 2, 3, 6},
             max against average pooling, no auxiliary head against weight 0.4, a frozen
             encoder against a trained one. From a random init (the default: no ImageNet weights
             are downloaded) a frozen encoder gives random features, so "frozen_backbone" then
             measures what the head alone learns; add --override=model.backbone_weights=
             IMAGENET1K_V1 with the weights on disk for the pretrained case.
  unet       UNet on a binary task (Ronneberger et al. 2015): bilinear against transposed-conv
             upsampling, crossed with BCE against BCE + (1 - soft IoU). Without a preset the
             embedded data runs with two classes; a preset must give a binary dataset.
  recipe     the from-scratch CamVid recipe (--preset=camvid or camvid_cpu) against itself
             with one choice undone at a time: no median-frequency class balancing, no random
             rescaling, a 5x smaller peak learning rate (--model, default pspnet).
  backbones  one head (--model, default upernet) on encoders of every family: ResNet-18,
             MobileNetV3-Large, EfficientNet-B0, RegNetY-400MF, ConvNeXt-T, Swin-T (the grid of
             segmentation_models.pytorch). ConvNeXt and Swin cannot dilate: with a head that
             dilates its encoder they run at output stride 32, and their variant says so.
"""
from __future__ import annotations

import importlib

from configs import fcn8s, fcn16s, fcn32s, pspnet as pspnet_config, unet as unet_config
from seg.config import set_field
from seg.errors import ConfigError


def _config_module(model: str):
    try:
        return importlib.import_module(f"configs.{model}")
    except ModuleNotFoundError:
        raise ConfigError(f"--model={model!r}: there is no configs/{model}.py") from None


def loss(preset: str | None = None, model: str = "pspnet") -> dict:
    get_config = _config_module(model).get_config
    configs = {"cross_entropy": get_config(preset)}
    for gamma in (0.5, 1.0, 2.0):
        c = get_config(preset)
        c.loss.name, c.loss.gamma = "focal", gamma
        configs[f"focal_gamma{gamma:g}"] = c
    return configs


def fcn_skips(preset: str | None = None) -> dict:
    return {"fcn32s": fcn32s.get_config(preset), "fcn16s": fcn16s.get_config(preset),
            "fcn8s": fcn8s.get_config(preset)}


PSPNET_CHANGES = {
    "baseline": {},
    "bins_1": {"model.bins": (1,)},
    "pool_max": {"model.pool": "max"},
    "aux_0": {"model.aux": False, "loss.aux_weight": 0.0},   # the same main network, no aux head
    "frozen_backbone": {"train.freeze": ("backbone",)},
}


def pspnet(preset: str | None = None) -> dict:
    configs = {}
    for name, changes in PSPNET_CHANGES.items():
        configs[name] = c = pspnet_config.get_config(preset)
        for key, value in changes.items():
            set_field(c, key, value)
    return configs


def unet(preset: str | None = None) -> dict:
    configs = {}
    for upsampling in ("transposed", "bilinear"):
        for loss_name in ("bce", "bce_soft_iou"):
            c = unet_config.get_config(preset)
            if preset is None:
                c.data.num_classes = 2   # background against the first object class
            c.model.bilinear = upsampling == "bilinear"
            c.loss.name = loss_name
            configs[f"{upsampling}-{loss_name}"] = c
    return configs


def recipe(preset: str | None = None, model: str = "pspnet") -> dict:
    get_config = _config_module(model).get_config
    configs = {name: get_config(preset)
               for name in ("recipe", "no_balance", "no_rescale", "lr_div5")}
    configs["no_balance"].loss.class_balance = ""
    configs["no_rescale"].data.scale_range = (1.0, 1.0)
    configs["lr_div5"].optimizer.lr /= 5          # the config's peak lr / 5
    return configs


ENCODERS = ("resnet18", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
            "convnext_tiny", "swin_t")


def backbones(preset: str | None = None, model: str = "upernet") -> dict:
    get_config = _config_module(model).get_config
    configs = {}
    for encoder in ENCODERS:
        c = get_config(preset)
        if "backbone" not in c.model:
            raise ConfigError(f"--model={model!r}: configs/{model}.py has no model.backbone")
        c.model.backbone = encoder
        name = encoder
        if encoder in ("convnext_tiny", "swin_t") and c.model.get("output_stride", 32) != 32:
            c.model.output_stride = 32
            name = f"{encoder}-os32"
        configs[name] = c
    return configs


STUDIES = {"loss": loss, "fcn_skips": fcn_skips, "pspnet": pspnet, "unet": unet,
           "backbones": backbones, "recipe": recipe}
TAKE_MODEL = ("loss", "backbones", "recipe")  # the studies that --model picks the base config of


def variants(study: str, preset: str | None = None, model: str | None = None,
             only: list[str] | None = None) -> dict:
    """The variants of `study`; `model` picks the base config of the studies that take one;
    `only` keeps the variants it names, in the study's order."""
    if study not in STUDIES:
        raise ConfigError(f"--study={study!r} is not one of {', '.join(STUDIES)}")
    if model is not None and study not in TAKE_MODEL:
        raise ConfigError(f"--model applies to --study={' and '.join(TAKE_MODEL)} only; "
                          f"{study!r} fixes its model")
    configs = STUDIES[study](preset) if model is None else STUDIES[study](preset, model=model)
    if only:
        unknown = [name for name in only if name not in configs]
        if unknown:
            raise ConfigError(f"--variants: {', '.join(map(repr, unknown))} not in --study="
                              f"{study!r} ({', '.join(configs)})")
        configs = {name: c for name, c in configs.items() if name in only}
    return configs
