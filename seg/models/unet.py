"""U-Net (Ronneberger et al. 2015) with batch norm and same-padding convs, and its decoder on the
encoders of seg.models.backbones."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.backbones import init_like_resnet_, init_logits_
from seg.models.heads import PyramidSegmenter, check_head_args, init_head_


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2; the convs have no bias because BN follows."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max pool, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Upsample x2, pad (or crop) to the skip's size, concatenate [skip, up], DoubleConv.

    in_channels: x's channels; skip_channels: the skip's (0: no skip, the block upsamples and
    convolves). A transposed conv (the paper's up-convolution) halves x's channels as it
    upsamples; bilinear upsampling has no weights, so the DoubleConv halves the concatenation
    in its middle instead.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 bilinear: bool = False):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            joined = in_channels + skip_channels
            self.conv = DoubleConv(joined, out_channels, joined // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is None:
            return self.conv(x)
        # An odd size was floored going down, so the upsampled map is a pixel short (UNet's max
        # pools) or long (an encoder's stride-2 convs round up): pad or crop it to the skip.
        dy = skip.shape[-2] - x.shape[-2]
        dx = skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Conv2d):
    """1x1 conv to the output logits."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)


class UNet(nn.Module):
    """U-Net with `depth` poolings; level i has base_channels * 2**i channels.

    With bilinear upsampling the deepest level and the up path carry half the channels (as in the
    widely used Pytorch-UNet): ~17.3M parameters at base 64 / depth 4, ~31.0M with transposed
    convs. Dropout2d follows the last two Down stages (as in the seed model); 0 disables it.
    forward(x) -> {"out": logits (B, num_outputs, H, W)}.
    """

    def __init__(
        self,
        num_outputs: int,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        bilinear: bool = False,
        dropout: float = 0.5,
    ):
        super().__init__()
        for arg, value in (("num_outputs", num_outputs), ("in_channels", in_channels),
                           ("base_channels", base_channels), ("depth", depth)):
            if value < 1:
                raise ValueError(f"{arg}={value!r} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        factor = 2 if bilinear else 1
        ch = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, ch[0])
        self.downs = nn.ModuleList(
            Down(ch[i - 1], ch[i] // (factor if i == depth else 1)) for i in range(1, depth + 1)
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(
            Up(ch[i] // factor, ch[i - 1], ch[i - 1] // (factor if i > 1 else 1), bilinear)
            for i in range(depth, 0, -1)
        )
        self.outc = OutConv(ch[0], num_outputs)
        init_like_resnet_(self)
        init_logits_(self.outc)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        depth = len(self.downs)
        skips = [self.inc(x)]
        for level, down in enumerate(self.downs, start=1):
            y = down(skips[-1])
            skips.append(self.dropout(y) if level >= depth - 1 else y)
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return {"out": self.outc(y)}


class UNetDecoder(nn.Module):
    """UNet's up path on an encoder's levels: five Up blocks take c5 from stride 32 to stride 1,
    each joined by the skip at its stride where the encoder has one (c4, c3, c2, c1; ConvNeXt and
    Swin start at c2), then a 1x1 conv to logits. forward({"c1"?, "c2", ..., "c5"}) -> logits."""

    def __init__(self, channels: dict[str, int], num_outputs: int,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), bilinear: bool = False):
        super().__init__()
        if len(decoder_channels) != 5 or any(c < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels={tuple(decoder_channels)!r} must be 5 positive "
                             "widths, one per x2 upsampling from stride 32 to 1")
        self.ups = nn.ModuleList()
        width = channels["c5"]
        for i, out in enumerate(decoder_channels):
            self.ups.append(Up(width, channels.get(f"c{4 - i}", 0), out, bilinear))
            width = out
        self.outc = OutConv(width, num_outputs)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features["c5"]
        for i, up in enumerate(self.ups):
            x = up(x, features.get(f"c{4 - i}"))
        return self.outc(x)


class BackboneUNet(PyramidSegmenter):
    """UNet's decoder (transposed-conv or bilinear Up blocks with DoubleConvs) on any encoder of
    seg.models.backbones, skips from every level it has (the encoder-decoder grid of
    segmentation_models.pytorch, decoder widths 256-128-64-32-16 as there).
    forward(x) -> {"out"} at the input's size. drop_path: the encoder's stochastic depth."""

    def __init__(self, num_outputs: int, backbone: str = "resnet34",
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 bilinear: bool = False, drop_path: float | None = None):
        check_head_args(num_outputs)
        widths = backbones.channels(backbone)
        levels = {level: level for level in widths}
        net = backbones.encoder(backbone, levels, 32, drop_path)
        classifier = UNetDecoder(widths, num_outputs, tuple(decoder_channels), bilinear)
        init_head_(classifier, classifier.outc)
        super().__init__(net, classifier, None, backbones.output_norms(backbone, levels))
