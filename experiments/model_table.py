"""Parameter counts and FLOPs of every model, counted on the meta device (no memory, no time).

  python experiments/model_table.py                       # 512x512, 21 classes (VOC)
  python experiments/model_table.py --size=360,480 --num_classes=11 --out=table.json

FLOPs are torch.utils.flop_counter's count of one forward pass in eval mode (2 per
multiply-accumulate, convolutions and matmuls only); papers usually quote multiply-accumulates
as "FLOPs", so both columns are printed.
"""
from __future__ import annotations

import sys


import torch
from absl import app, flags

from configs import (backbone_unet, deeplabv3, deeplabv3plus, fcn8s, fcn16s, fcn32s, fpn,
                     lraspp, pspnet, twostream, unet, upernet)
from seg import models, rundir

# (row label, config module, model overrides): the papers' backbones, then the CPU defaults.
ROWS = [
    ("FCN-32s, VGG-16", fcn32s, {"backbone": "vgg16"}),
    ("FCN-16s, VGG-16", fcn16s, {"backbone": "vgg16"}),
    ("FCN-8s, VGG-16", fcn8s, {"backbone": "vgg16"}),
    ("FCN, ResNet-50 (torchvision fcn_resnet50)", None, {"name": "fcn_resnet",
                                                          "backbone": "resnet50"}),
    ("UNet, base 64, transposed conv", unet, {}),
    ("UNet, base 64, bilinear", unet, {"bilinear": True}),
    ("PSPNet, ResNet-50, OS 8", pspnet, {"backbone": "resnet50"}),
    ("PSPNet, ResNet-18, OS 8 (CPU default)", pspnet, {}),
    ("DeepLabV3, ResNet-50, OS 8", deeplabv3, {"backbone": "resnet50"}),
    ("DeepLabV3, ResNet-18, OS 8 (CPU default)", deeplabv3, {}),
    ("Two-stream PSPNet, ResNeXt-50", twostream, {}),
    ("DeepLabV3, MobileNetV3-Large, OS 16 (torchvision deeplabv3_mobilenet_v3_large)", deeplabv3,
     {"backbone": "mobilenet_v3_large", "output_stride": 16, "rates": (12, 24, 36)}),
    ("LR-ASPP, MobileNetV3-Large, OS 16 (torchvision lraspp_mobilenet_v3_large)", lraspp, {}),
    ("DeepLabV3+, ResNet-101, OS 8, 512 channels, aux (mmsegmentation's widths)", deeplabv3plus,
     {"backbone": "resnet101", "output_stride": 8, "channels": 512, "aux": True}),
    ("DeepLabV3+, ResNet-50, OS 16", deeplabv3plus, {"backbone": "resnet50"}),
    ("DeepLabV3+, ResNet-18, OS 16 (CPU default)", deeplabv3plus, {}),
    ("UPerNet, ResNet-101", upernet, {"backbone": "resnet101"}),
    ("UPerNet, ResNet-50", upernet, {"backbone": "resnet50"}),
    ("UPerNet, ConvNeXt-T", upernet, {"backbone": "convnext_tiny"}),
    ("UPerNet, Swin-T", upernet, {"backbone": "swin_t"}),
    ("UPerNet, ResNet-18 (CPU default)", upernet, {}),
    ("Semantic FPN, ResNet-101", fpn, {"backbone": "resnet101"}),
    ("Semantic FPN, ResNet-50", fpn, {"backbone": "resnet50"}),
    ("Semantic FPN, ResNet-18 (CPU default)", fpn, {}),
    ("Semantic FPN, EfficientNet-B0", fpn, {"backbone": "efficientnet_b0"}),
    ("UNet decoder, ResNet-34", backbone_unet, {}),
    ("UNet decoder, RegNetY-400MF", backbone_unet, {"backbone": "regnet_y_400mf"}),
]

_SIZE = flags.DEFINE_list("size", ["512", "512"], "Input height,width.")
_CLASSES = flags.DEFINE_integer("num_classes", 21, "Output classes.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (optional).")


def measure(model_cfg, num_outputs: int, size: tuple[int, int]) -> dict:
    with torch.device("meta"):
        params = models.param_count(models.build(model_cfg, num_outputs))
    flops = models.forward_flops(model_cfg, num_outputs, size)
    return {"params": params, "gflops": flops / 1e9, "gmacs": flops / 2e9}


def model_config(config_module, overrides: dict):
    cfg = (config_module or pspnet).get_config().model
    if config_module is None:  # a model without its own config file: start from nothing
        cfg = cfg.__class__()
    cfg.unlock()
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def main(argv):
    del argv
    size = tuple(int(s) for s in _SIZE.value)
    if len(size) != 2:
        sys.exit(f"error: --size={','.join(_SIZE.value)} must be height,width")
    rows = []
    for label, module, overrides in ROWS:
        rows.append({"model": label, **measure(model_config(module, overrides), _CLASSES.value,
                                               size)})
    print(f"input {size[0]}x{size[1]}, {_CLASSES.value} classes\n"
          "| model | params | GFLOPs (2 x MAC) | GMACs |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.1f} | "
              f"{r['gmacs']:.1f} |")
    if _OUT.value:
        rundir.write_json(_OUT.value, {"size": size, "num_classes": _CLASSES.value,
                                        "rows": rows})


if __name__ == "__main__":
    app.run(main)
