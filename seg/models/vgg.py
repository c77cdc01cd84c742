"""VGG (Simonyan & Zisserman 2015) as a multi-scale encoder with torchvision's parameter names."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.vgg import cfgs, make_layers

from seg.models.backbones import init_like_resnet_

_CFG_OF = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
NAMES = (*_CFG_OF, *(f"{name}_bn" for name in _CFG_OF))

# Every VGG ends its five stages with a 2x2 max pool: same strides and widths for all depths.
STAGES = ("pool1", "pool2", "pool3", "pool4", "pool5")
STAGE_STRIDES = {stage: 2 ** i for i, stage in enumerate(STAGES, start=1)}
STAGE_CHANNELS = {"pool1": 64, "pool2": 128, "pool3": 256, "pool4": 512, "pool5": 512}


class _Features(nn.Module):
    """torchvision's VGG without avgpool and classifier, so that keys stay `features.N.*`."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def vgg(
    name: str = "vgg16",
    return_stages: Sequence[str] = ("pool3", "pool4", "pool5"),
    ceil_mode: bool = False,
) -> nn.Module:
    """A randomly initialised VGG whose forward returns {stage: feature map} for `return_stages`.

    Stage poolK has stride 2**K (STAGE_STRIDES) and STAGE_CHANNELS channels. Parameter names are
    torchvision's (`features.0.weight`, ...), so `torchvision.models.<name>().state_dict()`
    restricted to `features.*` loads strictly when pool5 is returned; layers after the last
    returned stage are dropped. Init is torchvision's (He fan-out convs, zero biases).

    ceil_mode=False is torchvision's pooling: an odd size loses its last row or column at each
    pool. FCN uses ceil_mode=True (as Caffe's pooling, which the FCN reference ran on): pool K
    then has ceil(H / 2**K) rows, cell i covers input pixels [2**K * i, 2**K * (i + 1)) for every
    stage, so all stages stay aligned at the top-left corner and every input pixel is seen.
    """
    if name not in NAMES:
        raise ValueError(f"name={name!r} is not one of {NAMES}")
    if not return_stages or any(stage not in STAGES for stage in return_stages):
        raise ValueError(f"return_stages={tuple(return_stages)!r} must be a non-empty subset of "
                         f"{STAGES}")
    features = make_layers(cfgs[_CFG_OF[name.removesuffix("_bn")]],
                           batch_norm=name.endswith("_bn"))
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    for i in pools:
        features[i].ceil_mode = ceil_mode
    init_like_resnet_(features)
    # The returned stages are the graph's outputs: the module itself holds no such list.
    nodes = {f"features.{i}": stage for i, stage in zip(pools, STAGES) if stage in return_stages}
    return create_feature_extractor(_Features(features), nodes)
