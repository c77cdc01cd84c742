"""model.init_from: start a run from trained weights, strictly.

The source is one of
  - a seg run directory: the params and buffers of its newest readable checkpoint;
  - a file: a seg checkpoint (ckpt_*.pt, best_*.pt), a weights file written by
    experiments/export.py, or any state_dict (alone or under "state_dict" / "model");
  - torchvision's segmentation weights by model name (fcn_resnet50, fcn_resnet101,
    deeplabv3_resnet50, deeplabv3_resnet101; optionally ":<weight name>", default DEFAULT),
    read from the torch hub cache where torchvision would have saved them, never downloaded.
    Our FCN-ResNet and DeepLabV3 use torchvision's tensor names, so these load as they are.

Loading is strict: every tensor of the model must come from the source with its shape, and
every tensor of the source must be used. Two exceptions, both named in the startup output:
  - a different number of classes: the tensors whose shapes differ only where the source has
    its number of outputs and the model has its own (the classifier layers) keep the model's
    fresh init, as mmsegmentation's `load_from` and torchvision's `num_classes` fine-tuning do;
  - an auxiliary head (`aux_classifier.*`) the model does not have is dropped: it only shapes
    the training loss.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torchvision.models import get_model_weights

from seg import rundir
from seg.functional import Buffers, Params
from seg.models import weights

# torchvision's segmentation models that have a counterpart here (model.name), by file name
TORCHVISION = {"fcn_resnet50": "fcn_resnet", "fcn_resnet101": "fcn_resnet",
               "deeplabv3_resnet50": "deeplabv3", "deeplabv3_resnet101": "deeplabv3"}
_AUX = "aux_classifier."
_OPTIONAL_SUFFIX = ".num_batches_tracked"   # absent from checkpoints older than PyTorch 0.4.1


@dataclass
class Source:
    tensors: dict[str, Tensor]
    description: str
    torchvision: bool = False


@dataclass
class Report:
    """What model.init_from did, for the startup output and summary.json."""
    source: str
    loaded: int
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    classes: tuple[int, int] | None = None     # (source's outputs, the model's) when they differ
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"init_from {self.source}: {self.loaded} tensors loaded"]
        if self.reinitialised:
            was, now = self.classes
            out.append(f"init_from: re-initialised for {now} outputs (the source has {was}): "
                       f"{', '.join(self.reinitialised)}")
        if self.dropped:
            out.append(f"init_from: dropped the source's auxiliary head (the model has none): "
                       f"{', '.join(self.dropped)}")
        return out + [f"init_from: {n}" for n in self.notes]

    def to_json(self) -> dict:
        return {"source": self.source, "loaded": self.loaded,
                "reinitialised": self.reinitialised, "dropped": self.dropped}


def load_source(spec: str) -> Source:
    """The tensors named by model.init_from (see the module docstring)."""
    path = Path(spec)
    if path.is_dir():
        return _from_run(path)
    if path.is_file():
        return _from_file(path)
    name, _, weight = spec.partition(":")
    if name in TORCHVISION:
        return _from_torchvision(name, weight or "DEFAULT")
    raise FileNotFoundError(
        f"model.init_from={spec!r}: no such run directory or file ({path.resolve()}), and not "
        f"one of torchvision's segmentation weights {sorted(TORCHVISION)}")


def _from_run(path: Path) -> Source:
    run = rundir.RunDir(path)
    if not run.config_file.exists():
        raise ValueError(f"model.init_from={str(path)!r}: {run.config_file} does not exist, "
                         "so this is not a seg run directory")
    saved = run.restore_checkpoint()
    if saved is None:
        raise ValueError(f"model.init_from={str(path)!r}: no readable checkpoint in "
                         f"{run.checkpoints}")
    state = saved["state"]
    return Source({**state["params"], **state["buffers"]},
                  f"{path} (step {int(state['step'])})")


def _from_file(path: Path) -> Source:
    try:
        obj = rundir.load_checkpoint(path)
    except Exception as e:  # a truncated zip, a pickle of arbitrary objects: all unusable
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"model.init_from: {path} is not a readable torch file "
                         f"({type(e).__name__}: {first_line})") from None
    state = obj.get("state") if isinstance(obj, dict) else None
    if isinstance(state, dict) and {"params", "buffers"} <= set(state):  # a seg checkpoint
        step = f" (step {int(state['step'])})" if "step" in state else ""
        return Source({**state["params"], **state["buffers"]}, f"{path}{step}")
    return Source(weights.as_state_dict(obj, path, "model.init_from"), str(path))


def _from_torchvision(name: str, weight: str) -> Source:
    enum = get_model_weights(name)
    if weight not in enum.__members__:
        raise ValueError(f"model.init_from={name}:{weight}: {name} has the weights "
                         f"{list(enum.__members__)}")
    url = enum[weight].url
    # read only from the torch hub cache, the folder torchvision's weights are kept in;
    # a missing file is an error, never fetched
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init_from={name!r} needs the file {path}, which is not there (nothing is "
            f"downloaded): fetch {url} elsewhere and put it in {path.parent}")
    tensors = weights.read_state_dict(path, "model.init_from")
    return Source(tensors, f"torchvision {name} {enum[weight].name} ({path.name})",
                  torchvision=True)


def apply(params: Params, buffers: Buffers, source: Source, num_outputs: int
          ) -> tuple[Params, Buffers, Report]:
    """New (params, buffers) with every tensor taken from `source`, strictly (see the module
    docstring); ValueError naming the keys when the source does not fit the model."""
    target = {**params, **buffers}
    given = source.tensors
    has_aux = any(k.startswith(_AUX) for k in target)
    missing = sorted(k for k in target.keys() - given.keys() if not k.endswith(_OPTIONAL_SUFFIX))
    unused = sorted(given.keys() - target.keys())
    dropped = [k for k in unused if k.startswith(_AUX) and not has_aux]
    unused = [k for k in unused if k not in dropped]
    if missing or unused:
        raise ValueError(f"model.init_from={source.description}: its tensors do not fit the "
                         f"model: missing {_some(missing)}; not in the model {_some(unused)}")
    reshaped = {k: (tuple(given[k].shape), tuple(v.shape)) for k, v in target.items()
                if k in given and given[k].shape != v.shape}
    was = _source_outputs(reshaped, num_outputs)
    if reshaped and was is None:
        wrong = [f"{k}: {a} vs the model's {b}" for k, (a, b) in reshaped.items()]
        raise ValueError(f"model.init_from={source.description}: shapes differ beyond the "
                         f"number of classes: {_some(wrong)}")

    def take(tree: dict[str, Tensor]) -> dict[str, Tensor]:
        # a copy in the model's dtype, device and layout: the train step may donate its params
        return {k: v if k in reshaped or k not in given else
                torch.empty_like(v).copy_(given[k]) for k, v in tree.items()}

    report = Report(source.description, sum(k in given for k in target) - len(reshaped),
                    sorted(reshaped), dropped, (was, num_outputs) if reshaped else None)
    return take(params), take(buffers), report


def _source_outputs(reshaped: dict[str, tuple[tuple, tuple]], num_outputs: int) -> int | None:
    """The source's number of outputs when every shape difference is one of classes: in each
    differing dimension the model has num_outputs and the source one same other number."""
    found = set()
    for a, b in reshaped.values():
        if len(a) != len(b):
            return None
        for x, y in zip(a, b):
            if x != y:
                if y != num_outputs:
                    return None
                found.add(x)
    return found.pop() if len(found) == 1 else None


def _some(keys: list[str], shown: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
