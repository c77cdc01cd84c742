"""FCN (Long, Shelhamer & Darrell 2015): FCN-32s/16s/8s on VGG, and torchvision's FCN on a
dilated encoder (ResNet by default)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.backbones import init_like_resnet_, init_logits_
from seg.models.heads import FCNHead, Segmenter, check_head_args, init_head_
from seg.models.vgg import STAGE_CHANNELS, vgg

# Output stride of each variant, and the pool stages whose scores it fuses (deepest first).
VARIANTS = {"32s": (32, ()), "16s": (16, ("pool4",)), "8s": (8, ("pool4", "pool3"))}


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """Weights (channels, channels, 2f, 2f) of a ConvTranspose2d(stride=f, padding=f // 2) that
    upsamples every channel on its own: bilinear interpolation with align_corners=False, away
    from the border of f // 2 pixels where the transposed conv sees zeros instead of the edge."""
    if factor < 2 or factor % 2:
        raise ValueError(f"factor={factor!r} must be an even integer >= 2")
    # Tap t of the transposed conv lands (t - f + 0.5) / f input pixels from its source.
    taps = 1 - (torch.arange(2 * factor) - (factor - 0.5)).abs() / factor
    weight = torch.zeros(channels, channels, 2 * factor, 2 * factor)
    weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]
    return weight


def _upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Learnable x`factor` upsampling initialised to bilinear; output size is factor * input."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2,
                            bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, factor))
    return up


def _crop(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # Grids are aligned at the top-left (ceil-mode pooling), so the excess is bottom/right only.
    return x[..., : size[0], : size[1]]


def _fuse(upsampled: torch.Tensor, skip_score: torch.Tensor) -> torch.Tensor:
    return _crop(upsampled, skip_score.shape[-2:]) + skip_score


def _score(in_channels: int, num_outputs: int) -> nn.Conv2d:
    """A skip's 1x1 score conv, zero-initialised as in the reference code: the fused net starts
    from the coarser net's predictions, and the zero weights still get gradients."""
    conv = nn.Conv2d(in_channels, num_outputs, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCNVGG(nn.Module):
    """FCN-32s / 16s / 8s on a VGG; forward(x) -> {"out": logits at x's size}, any size.

    Layer names are the reference code's: fc6 (7x7 conv) and fc7 (1x1 conv), each followed by
    ReLU and element-wise Dropout (Caffe's Dropout on a conv map), score_fr; score_pool4 +
    upscore2 (16s, 8s); score_pool3 + upscore_pool4 (8s); the final upsampling upscore32 /
    upscore16 / upscore8. The upsampling layers are bias-free transposed convs initialised to
    bilinear and learnable: the paper fixes the final one (the configs freeze it with
    train.freeze), the reference code fixes all three.

    fc_channels=4096 is the paper's: fc6/fc7 are VGG's classifier made convolutional, 119.5M of
    FCN-8s's 134.5M parameters. A narrower head (DeepLab-LargeFOV cut it to 1024) is far
    cheaper to train from scratch.

    Deviation from the reference, same parameters: fc6 pads by 3 instead of padding conv1_1 by
    100, and the maps are aligned by the transposed convs' padding (f // 2) plus a bottom/right
    crop instead of Caffe's crop offsets. The 100-pixel pad only existed so that an unpadded 7x7
    fc6 had an input on small images; it adds 200 rows and columns of compute to every image.
    """

    def __init__(self, num_outputs: int, variant: str = "8s", backbone: str = "vgg16",
                 dropout: float = 0.5, fc_channels: int = 4096):
        super().__init__()
        check_head_args(num_outputs, dropout)
        if fc_channels < 1:
            raise ValueError(f"fc_channels={fc_channels!r} must be >= 1")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not one of {tuple(VARIANTS)}")
        stride, skips = VARIANTS[variant]
        self.backbone = vgg(backbone, ("pool5", *skips), ceil_mode=True)
        self.fc6 = nn.Conv2d(STAGE_CHANNELS["pool5"], fc_channels, 7, padding=3)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(fc_channels, num_outputs, 1)
        init_like_resnet_(self.fc6)
        init_like_resnet_(self.fc7)
        init_logits_(self.score_fr)
        # Layers a variant lacks are registered as None: forward reads the variant off them.
        for pool, up in (("pool4", "upscore2"), ("pool3", "upscore_pool4")):
            used = pool in skips
            self.add_module(f"score_{pool}",
                            _score(STAGE_CHANNELS[pool], num_outputs) if used else None)
            self.add_module(up, _upsampler(num_outputs, 2) if used else None)
        for factor in (32, 16, 8):
            self.add_module(f"upscore{factor}",
                            _upsampler(num_outputs, factor) if factor == stride else None)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        h = self.drop6(F.relu(self.fc6(features["pool5"])))
        h = self.drop7(F.relu(self.fc7(h)))
        score = self.score_fr(h)
        size = x.shape[-2:]
        if self.score_pool4 is None:
            return {"out": _crop(self.upscore32(score), size)}
        score = _fuse(self.upscore2(score), self.score_pool4(features["pool4"]))
        if self.score_pool3 is None:
            return {"out": _crop(self.upscore16(score), size)}
        score = _fuse(self.upscore_pool4(score), self.score_pool3(features["pool3"]))
        return {"out": _crop(self.upscore8(score), size)}


class FCNResNet(Segmenter):
    """torchvision's fcn_resnet50/101: an FCNHead on the last stage of a dilated encoder and an
    auxiliary FCNHead on its aux level (layer3 of a ResNet), both upsampled bilinearly to the
    input's size. Parameter names equal torchvision's, so its state_dicts load strictly. Any
    encoder of seg.models.backbones works. forward(x) -> {"out", "aux" (if aux)}."""

    def __init__(self, num_outputs: int, backbone: str = "resnet50", output_stride: int = 8,
                 aux: bool = True, dropout: float = 0.1, drop_path: float | None = None):
        check_head_args(num_outputs, dropout)
        aux_level = backbones.aux_level(backbone)
        levels = {"c5": "out", **({aux_level: "aux"} if aux else {})}
        net = backbones.encoder(backbone, levels, output_stride, drop_path)
        channels = backbones.channels(backbone)
        classifier = FCNHead(channels["c5"], num_outputs, dropout)
        aux_classifier = FCNHead(channels[aux_level], num_outputs, dropout) if aux else None
        for head in (classifier, aux_classifier):
            if head is not None:
                init_head_(head, head[-1])
        super().__init__(net, classifier, aux_classifier,
                         backbones.output_norms(backbone, levels))
