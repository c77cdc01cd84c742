"""Pretrained backbone weights from disk: torchvision's weight names or a file, never downloaded.

`load_backbone` reads a torchvision state_dict (from the torch hub cache, where torchvision would
have saved it, or from an explicit path); `apply_backbone` puts it into a model's flat params and
buffers dicts under the encoder's prefix, strictly: every encoder tensor must be provided and
every loaded tensor used, except the classification head torchvision's checkpoints carry.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor
from torchvision.models import get_model_weights

from seg.functional import Buffers, Params

# The ImageNet classifiers of torchvision's checkpoints, which a segmentation encoder drops.
# Only these keys may go unused, and only when the encoder has no tensor of that name (an FCN
# that keeps VGG's fc6/fc7 under these names gets them checked like any other key).
def _linear(*names: str) -> frozenset[str]:
    return frozenset(f"{name}.{p}" for name in names for p in ("weight", "bias"))


CLASSIFIER_KEYS: dict[str, frozenset[str]] = {
    "resnet": _linear("fc"),  # also ResNeXt, Wide ResNet, RegNet, ShuffleNetV2
    "vgg": _linear("classifier.0", "classifier.3", "classifier.6"),
    "mobilenet_v3": _linear("classifier.0", "classifier.3"),
    # MobileNetV2, EfficientNet (V1 and V2): dropout, then one linear layer
    "efficientnet": _linear("classifier.1"),
    "convnext": _linear("classifier.0", "classifier.2"),  # LayerNorm of the pooled map, linear
    "swin": _linear("norm", "head"),  # the last stage's LayerNorm (seg adds its own), linear
}
_DROPPABLE = frozenset().union(*CLASSIFIER_KEYS.values())

# Checkpoints saved before PyTorch 0.4.1 (torchvision's oldest ImageNet files) lack BatchNorm's
# counter; nn.BatchNorm2d's own loader accepts that too. It only matters with momentum=None.
_OPTIONAL_SUFFIX = ".num_batches_tracked"

# A torchvision weight name (IMAGENET1K_V1, DEFAULT): anything else is read as a file path.
_WEIGHT_NAME = re.compile(r"[A-Za-z0-9_]+")


def cache_path(spec: str, arch: str) -> tuple[Path, str]:
    """(file in the torch hub cache, URL it is published at) for torchvision weight `spec`."""
    try:
        enum = get_model_weights(arch)
    except ValueError:
        raise ValueError(f"model.backbone_weights={spec!r}: arch={arch!r} is not a torchvision "
                         "model with published weights") from None
    if spec not in enum.__members__:
        raise ValueError(f"model.backbone_weights={spec!r} is not a weight of {arch}: one of "
                         f"{list(enum.__members__)} or a file path")
    url = enum[spec].url
    # torch.hub keeps a fetched weight file under the URL's file name in <hub>/checkpoints.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def load_backbone(spec: str, arch: str) -> dict[str, Tensor]:
    """The state_dict named by `spec`: a torchvision weight name of `arch`, or a file path.

    A file may hold the state_dict itself or a dict with a "state_dict" or "model" entry.
    Raises FileNotFoundError (naming the file, its folder and its URL) when it is not on disk.
    """
    if not spec:
        raise ValueError("model.backbone_weights='' means random init: there is nothing to load")
    if _WEIGHT_NAME.fullmatch(spec) and not os.path.isfile(spec):
        path, url = cache_path(spec, arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.backbone_weights={spec!r} for {arch} needs the file {path}, which is not "
                f"there (nothing is downloaded): fetch {url} elsewhere and put it in "
                f"{path.parent}, or set model.backbone_weights to a file path, or to '' for "
                "random init")
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model.backbone_weights={spec!r}: no file {path.resolve()}")
    return read_state_dict(path)


def read_state_dict(path: Path, field: str = "model.backbone_weights") -> dict[str, Tensor]:
    """The state_dict in file `path` (alone, or under "state_dict" or "model"); ValueError
    naming `field` and the file when it holds something else or cannot be read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of arbitrary objects, ...: all unusable
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{field}: {path} is not a readable torch state_dict "
                         f"({type(e).__name__}: {first_line})") from e
    return as_state_dict(obj, path, field)


def as_state_dict(obj, path: Path, field: str) -> dict[str, Tensor]:
    """The state_dict of a loaded file: `obj` itself or its "state_dict" or "model" entry."""
    if isinstance(obj, dict):
        for entry in ("state_dict", "model"):
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())):
        raise ValueError(f"{field}: {path} does not hold a state_dict (a dict of "
                         "name -> tensor, alone or under 'state_dict' or 'model')")
    return dict(obj)


def apply_backbone(params: Params, buffers: Buffers, state_dict: dict[str, Tensor],
                   prefix: str = "backbone.") -> tuple[Params, Buffers]:
    """New (params, buffers) with every tensor under `prefix` taken from `state_dict`.

    Loaded tensors are copied to the dtype and device of the tensors they replace. Raises
    ValueError naming the keys when an encoder tensor is not provided, a loaded tensor (other
    than a classifier in CLASSIFIER_KEYS) has no place in the encoder, or shapes differ.
    """
    encoder = {k[len(prefix):]: v for tree in (params, buffers) for k, v in tree.items()
               if k.startswith(prefix)}
    if not encoder:
        raise ValueError(f"prefix={prefix!r} matches no parameter or buffer of the model")
    missing = sorted(k for k in encoder.keys() - state_dict.keys()
                     if not k.endswith(_OPTIONAL_SUFFIX))
    unused = sorted(k for k in state_dict.keys() - encoder.keys() if k not in _DROPPABLE)
    if missing or unused:
        raise ValueError(f"backbone weights do not fit the encoder {prefix!r}: missing "
                         f"{_some(missing)}; not in the encoder {_some(unused)}")
    wrong = [f"{k}: loaded {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in encoder.items() if k in state_dict and state_dict[k].shape != v.shape]
    if wrong:
        raise ValueError(f"backbone weights have the wrong shape for {prefix!r}: {_some(wrong)}")

    def replace(tree: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(tree)
        for k, v in tree.items():
            key = k[len(prefix):]
            if k.startswith(prefix) and key in state_dict:
                # A copy: the train step may donate (overwrite) the storage of its params.
                out[k] = state_dict[key].to(device=v.device, dtype=v.dtype, copy=True)
        return out

    return replace(params), replace(buffers)


def _some(keys: list[str], shown: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
