"""A config made into the things a run needs: data, model, weights, loss, and the steps.

Training (seg/loop.py), evaluation of a finished run (seg/evaluation.py) and inference all
build through here, so they see the same data, the same model and the same forward: the run's
precision, memory format and eval settings (`infer_options`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seg import amp, data, functional, inference, init_from, losses, metrics, models, optim
from seg import seeds, visualize
from seg import train as steps
from seg.data import DatasetInfo, Split, balance
from seg.errors import ConfigError, config_errors
from seg.functional import Buffers, Params
from seg.models import weights


class Experiment(NamedTuple):
    splits: dict[str, Split]     # "train", "val" and, when the dataset has one, "test"
    model: nn.Module             # the definition (on the meta device)
    params: Params               # initial parameters (seeded; pretrained backbone loaded)
    buffers: Buffers
    loss_fn: losses.Loss
    num_outputs: int             # 1 for binary losses (one logit), else data.num_classes
    class_weights: tuple | None = None  # measured on the train split for loss.class_balance
    init_report: init_from.Report | None = None   # what model.init_from loaded, if set

    @property
    def info(self) -> DatasetInfo:
        """Class names, palette, ignore index and the normalisation of every split."""
        return self.splits["train"].dataset.info


def num_outputs(cfg) -> int:
    return 1 if cfg.loss.name in losses.BINARY_LOSSES else cfg.data.num_classes


def build(cfg, device: torch.device, *, with_data: bool = True, pretrained: bool = True
          ) -> Experiment:
    """Every piece of the run from `cfg`. A bad value raises ConfigError (DataError for data
    on disk) naming the field; nothing is written. with_data=False leaves the splits empty;
    pretrained=False skips model.backbone_weights and model.init_from (for a caller that
    restores the run's own weights next)."""
    with config_errors():
        _check_init(cfg)
        splits = data.build_splits(cfg.data) if with_data else {}
        model, params, buffers, report = init_model(cfg, device, pretrained=pretrained)
        _check_modules(cfg, model)
        weights = None
        if cfg.loss.class_balance and with_data:
            weights = balance.median_frequency_weights(splits["train"].dataset)
        loss_fn = losses.build(cfg.loss, cfg.data.num_classes, class_weights=weights)
    return Experiment(splits, model, params, buffers, loss_fn, num_outputs(cfg), weights,
                      report)


def init_model(cfg, device: torch.device, *, pretrained: bool = True
               ) -> tuple[nn.Module, Params, Buffers, init_from.Report | None]:
    """The model's definition and its initial params and buffers: seeded by cfg.seed, then
    model.backbone_weights or model.init_from loaded (unless pretrained=False), and what
    init_from loaded (None without it). Raises what the builders raise."""
    model, params, buffers = functional.init(
        lambda: models.build(cfg.model, num_outputs(cfg)), seed=cfg.seed, device=device)
    report = None
    if pretrained and cfg.model.backbone_weights:
        params, buffers = _load_backbone(cfg, params, buffers)
    if pretrained and cfg.model.get("init_from"):
        params, buffers, report = _init_from(cfg, params, buffers)
    return model, params, buffers, report


def check(cfg) -> None:
    """The checks that need neither data nor weights, for every variant of a sweep before the
    first trains: the builders of the model (on the meta device), loss, optimizer, steps and
    eval settings run and raise what they would raise in the run."""
    with config_errors():
        _check_init(cfg)
        with torch.device("meta"):
            model = models.build(cfg.model, num_outputs(cfg))
        _check_modules(cfg, model)
        loss_fn = losses.build(cfg.loss, cfg.data.num_classes)
        train_step(cfg, model, loss_fn)
        eval_step(cfg, model, loss_fn)


def _load_backbone(cfg, params: Params, buffers: Buffers) -> tuple[Params, Buffers]:
    """model.backbone_weights -> params/buffers with the encoder ("backbone.") replaced."""
    arch = cfg.model.get("backbone")
    if arch is None:
        raise ConfigError(f"model.backbone_weights={cfg.model.backbone_weights!r} but "
                          f"model.name={cfg.model.name!r} has no pretrained backbone")
    return weights.apply_backbone(params, buffers,
                                  weights.load_backbone(cfg.model.backbone_weights, arch))


def _check_init(cfg) -> None:
    if cfg.model.get("init_from") and cfg.model.backbone_weights:
        raise ValueError(f"model.init_from={cfg.model.init_from!r} and model.backbone_weights="
                         f"{cfg.model.backbone_weights!r} are both set: init_from replaces every "
                         "tensor, the backbone's too; set one")
    best = cfg.train.get("best_metric", "")
    if best and best not in EVAL_SCALARS:
        raise ValueError(f"train.best_metric={best!r} is not one of {sorted(EVAL_SCALARS)} "
                         "(or '' to keep no best weights)")


# The scalar numbers of a val eval (seg.metrics.scores, and the loss): what
# train.best_metric may name.
EVAL_SCALARS = frozenset({"loss", *(k for k, v in metrics.scores(torch.eye(2)).items()
                                    if not isinstance(v, list))})


def _init_from(cfg, params: Params, buffers: Buffers):
    source = init_from.load_source(cfg.model.init_from)
    params, buffers, report = init_from.apply(params, buffers, source, num_outputs(cfg))
    if source.torchvision and cfg.data.normalize != "imagenet":
        report.notes.append(f"torchvision's weights were trained on ImageNet-normalised images; "
                            f"this run has data.normalize={cfg.data.normalize!r}")
    return params, buffers, report


def _check_modules(cfg, model: nn.Module) -> None:
    """train.freeze and train.checkpoint_activations name parts the model must have."""
    for prefix in cfg.train.freeze:
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise ConfigError(f"train.freeze names {prefix!r}, which is not a module of "
                              f"model.name={cfg.model.name!r}") from None
    if cfg.train.checkpoint_activations and not any(
            isinstance(m, models.CHECKPOINT_BLOCKS) for m in model.modules()):
        raise ConfigError(f"train.checkpoint_activations=True but model.name="
                          f"{cfg.model.name!r} has no encoder block or UNet double conv to "
                          "recompute")


def inference_meta(cfg, info: DatasetInfo) -> dict:
    """What using the trained model needs besides its weights (the run directory's
    inference.json): the model's definition (seg.models.build(meta["model"],
    meta["num_outputs"])), the classes, their colours (the default palette when the dataset has
    none), the ignore index, the normalisation, the eval preprocessing (data.resize, padding)
    and the eval forward's settings."""
    return {"model": {k: v for k, v in cfg.model.to_dict().items()
                      if k == "name" or k not in models.INIT_FIELDS},
            "num_outputs": num_outputs(cfg), "class_names": list(info.class_names),
            "palette": visualize.palette_tensor(info.palette, info.num_classes).tolist(),
            "ignore_index": info.ignore_index, "mean": list(info.mean), "std": list(info.std),
            "resize": cfg.data.resize, "pad_multiple": cfg.data.pad_multiple,
            "eval": cfg.eval.to_dict(), "precision": cfg.train.precision,
            "channels_last": cfg.train.channels_last}


def infer_options(cfg) -> dict:
    """How every eval-mode forward of the run is made (seg.train.make_infer's options)."""
    return {"logits_fn": inference.from_config(cfg.eval), "precision": cfg.train.precision,
            "channels_last": cfg.train.channels_last}


def infer(cfg, model: nn.Module):
    """The run's eval-mode forward: infer(params, buffers, images) -> float32 logits."""
    with config_errors():
        return steps.make_infer(model, **infer_options(cfg))


def eval_step(cfg, model: nn.Module, loss_fn) -> steps.EvalStep:
    with config_errors():
        return steps.make_eval_step(model, loss_fn, cfg.data.num_classes,
                                    ignore_index=cfg.data.ignore_index,
                                    compile=cfg.train.compile, per_image=cfg.eval.per_image,
                                    **infer_options(cfg))


def train_step(cfg, model: nn.Module, loss_fn, grad_reduce=None):
    """The train step of the config's optimizer, schedule, freezing and fast-path settings;
    with train.num_seeds > 1 the step of that many stacked members (seg.seeds)."""
    t = cfg.train
    with config_errors():
        optimizer, schedule = optim.build(cfg.optimizer, cfg.schedule, t.steps)
        if t.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite={t.nonfinite!r} is not one of stop, skip")
        num_seeds = t.get("num_seeds", 1)
        if not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"train.num_seeds={num_seeds!r} must be an integer >= 1")
        trainable = trainable_params(cfg, model)
        make = steps.make_train_step if num_seeds == 1 else seeds.make_train_step
        step = make(
            model, loss_fn, optimizer, schedule, trainable=trainable, frozen_modules=t.freeze,
            aux_weight=cfg.loss.aux_weight, grad_impl=t.grad_impl, compile=t.compile,
            donate=True,  # the loop never reads an old state again
            grad_reduce=grad_reduce, skip_nonfinite=t.nonfinite == "skip",
            precision=t.precision, channels_last=t.channels_last,
            checkpoint_activations=t.checkpoint_activations,
            clip_norm=cfg.optimizer.clip_norm, loss_scale=loss_scale(cfg))
    return step, optimizer, trainable


def loss_scale(cfg) -> amp.LossScale | None:
    """The dynamic loss scaling rule of an fp16 run (GradScaler's factors), else None."""
    if cfg.train.precision != "fp16":
        return None
    with config_errors():
        return amp.LossScale(init_scale=cfg.train.loss_scale,
                             growth_interval=cfg.train.loss_scale_growth_interval).check()


def trainable_params(cfg, model: nn.Module) -> list[str]:
    names = [k for k, _ in model.named_parameters()]
    return functional.split_trainable(names, cfg.train.freeze)[0]
