"""torchvision classification networks as multi-scale encoders, and the init of the layers built
on them.

`encoder(name, levels)` returns the network named `name` in torchvision.models (random init)
cut down to a module whose forward returns {key: feature map (B, C, H, W)} for the requested
levels: c1 ... c5 at nominal strides 2, 4, 8, 16, 32 (the C2-C5 of Lin et al. 2017's FPN).
Parameter and buffer names are torchvision's (`layer1.0.conv1.weight`, `features.3.block.0.0.
weight`), so an ImageNet state_dict of the same network loads strictly (seg/models/weights.py).

The module is a torch.fx GraphModule built by torchvision's create_feature_extractor. Each
family's blocks are leaves of the trace: they stay the torchvision modules themselves, so their
train/eval behaviour (BatchNorm, dropout, stochastic depth) follows their own mode flag at run
time (functional.set_mode, frozen sub-networks), activation checkpointing finds them, and the
graph only routes tensors from one block to the next.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision
from torch import fx
from torchvision.models import (convnext, efficientnet, mobilenetv2, mobilenetv3, regnet, resnet,
                                shufflenetv2, swin_transformer)
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import StochasticDepth

LEVELS = ("c1", "c2", "c3", "c4", "c5")  # nominal strides 2, 4, 8, 16, 32
OUTPUT_STRIDES = (8, 16, 32)


class Family(NamedTuple):
    """How seg reads one kind of torchvision classifier.

    body: the modules the forward runs in order up to the last stage; "x.*" stands for the
      children of x. A level is the output of one of them (see `taps`).
    blocks: traced as leaves (see the module docstring); also what activation checkpointing
      recomputes (seg.models.CHECKPOINT_BLOCKS).
    dilation: how a stage trades its stride 2 for dilation (`dilate_`): "input" dilates a conv
      by the stride its input has lost (the strided conv keeps the previous rate, as
      torchvision's ResNet); "output" gives the strided conv the new rate too (torchvision's
      dilated MobileNetV3, which its segmentation models use); None: the stride is taken by a
      layer that has no dilated form (a 2x2 patchify conv, patch merging): output stride 32 only.
    taps: "last": a level is the last body module at its stride. "first": the first module that
      reaches the stride (the strided block), the deepest level the last module: torchvision's
      MobileNet convention (its `_is_cn` blocks), which its LR-ASPP and DeepLabV3 read.
    norm_eps: stage outputs are un-normalised residual streams (ConvNeXt, Swin): the models add a
      LayerNorm per level with this eps (`output_norms`), as the dense-prediction backbones of
      both papers and mmsegmentation do. None: the stages end in BatchNorm + activation.
    aux_level: the level an auxiliary head reads: layer3 for ResNets (torchvision's FCN and
      DeepLabV3), the stride-8 block for MobileNetV3 (torchvision's deeplabv3_mobilenet_v3_large).
    """
    body: tuple[str, ...]
    blocks: tuple[type, ...]
    dilation: str | None
    taps: str = "last"
    norm_eps: float | None = None
    nhwc: bool = False  # Swin's stages are (B, H, W, C); the encoder returns (B, C, H, W)
    aux_level: str = "c4"


_MOBILENET = dict(body=("features.*",), dilation="output", taps="first", aux_level="c3")
FAMILIES: dict[type, Family] = {
    resnet.ResNet: Family(("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                           "layer4"), (resnet.BasicBlock, resnet.Bottleneck), "input"),
    mobilenetv3.MobileNetV3: Family(blocks=(mobilenetv3.InvertedResidual,), **_MOBILENET),
    mobilenetv2.MobileNetV2: Family(blocks=(mobilenetv2.InvertedResidual,), **_MOBILENET),
    efficientnet.EfficientNet: Family(("features.*",), (efficientnet.MBConv,
                                                        efficientnet.FusedMBConv), "input"),
    convnext.ConvNeXt: Family(("features.*",), (convnext.CNBlock,), None, norm_eps=1e-6),
    swin_transformer.SwinTransformer: Family(
        ("features.*",), (swin_transformer.SwinTransformerBlock,
                          swin_transformer.SwinTransformerBlockV2), None, norm_eps=1e-5,
        nhwc=True),
    regnet.RegNet: Family(("stem", "trunk_output.*"), (regnet.ResBottleneckBlock,), "input"),
    shufflenetv2.ShuffleNetV2: Family(("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
                                      (shufflenetv2.InvertedResidual,), "input"),
}
BLOCKS: tuple[type, ...] = tuple(b for f in FAMILIES.values() for b in f.blocks)


class Layout(NamedTuple):
    """What a probe of the undilated network finds (`_layout`)."""
    family: Family
    taps: dict[str, str]           # level -> body module path
    channels: dict[str, int]       # level -> channels
    conv_strides: dict[str, int]   # Conv2d path -> nominal stride of its input
    drop_path: float               # the largest stochastic depth rate torchvision gives a block


def names() -> list[str]:
    """Every torchvision classification network `encoder` accepts."""
    return [n for n in torchvision.models.list_models(module=torchvision.models)
            if _family_of(n) is not None]


def _family_of(name: str) -> Family | None:
    # torchvision's builders are annotated with the class they return (-> ResNet, ...)
    builder = torchvision.models.get_model_builder(name)
    return FAMILIES.get(inspect.signature(builder).return_annotation)


def _check_name(name: str) -> None:
    if name not in torchvision.models.list_models(module=torchvision.models) \
            or _family_of(name) is None:
        families = ", ".join(sorted(c.__name__ for c in FAMILIES))
        raise ValueError(f"backbone name={name!r} is not a torchvision classification network "
                         f"of a family seg reads ({families}); "
                         "seg.models.backbones.names() lists them")


def _torchvision_net(name: str) -> nn.Module:
    """torchvision.models.<name>(weights=None) on the default device (meta under
    `torch.device("meta")`)."""
    if torch.empty(0).device.type == "meta" and _family_of(name) is FAMILIES[regnet.RegNet]:
        # RegNet's builders compute the stage widths with tensor ops and read them back
        # (.tolist()), which the meta device cannot: build on the CPU, then drop the values.
        with torch.device("cpu"):
            return torchvision.models.get_model(name, weights=None).to("meta")
    return torchvision.models.get_model(name, weights=None)


def _body(net: nn.Module, family: Family) -> list[str]:
    paths = []
    for path in family.body:
        if path.endswith(".*"):
            parent = path[:-2]
            paths += [f"{parent}.{child}"
                      for child, _ in net.get_submodule(parent).named_children()]
        else:
            paths.append(path)
    return paths


@functools.lru_cache(maxsize=None)
def _layout(name: str) -> Layout:
    """Runs the undilated network once on the meta device (no memory, no time) and records the
    stride and width of every body module's output and the stride of every conv's input."""
    _check_name(name)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # RegNet builds on the CPU
        net = _torchvision_net(name).eval()
    family = FAMILIES[type(net)]
    size = 256  # a multiple of 32: every stride divides it
    outputs, conv_strides, hooks = {}, {}, []
    for path in _body(net, family):
        def record(_m, _i, out, path=path):
            h, c = (out.shape[1], out.shape[3]) if family.nhwc else (out.shape[2], out.shape[1])
            outputs[path] = (size // h, c)
        hooks.append(net.get_submodule(path).register_forward_hook(record))
    for path, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            def record_input(_m, args, path=path):
                conv_strides[path] = size // args[0].shape[-2]
            hooks.append(m.register_forward_pre_hook(record_input))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    taps, channels = {}, {}
    body = list(outputs)
    for k, level in enumerate(LEVELS, start=1):
        at = [p for p in body if outputs[p][0] == 2 ** k]
        if at:
            taps[level] = at[0] if family.taps == "first" and level != "c5" else at[-1]
            channels[level] = outputs[taps[level]][1]
    rates = [m.p for m in net.modules() if isinstance(m, StochasticDepth)]
    return Layout(family, taps, channels, conv_strides, max(rates, default=0.0))


def channels(name: str) -> dict[str, int]:
    """{level: channels} of every level the network has (ConvNeXt and Swin start at c2)."""
    return dict(_layout(name).channels)


def aux_level(name: str) -> str:
    """The level torchvision's segmentation models put an auxiliary head on (Family.aux_level)."""
    return _layout(name).family.aux_level


def encoder(name: str, levels: dict[str, str], output_stride: int = 32,
            drop_path: float | None = None) -> nn.Module:
    """torchvision's `name` (random init) returning {levels[level]: map} for each level.

    output_stride 16 or 8 trades the stride of the last one or two stages for dilation
    (Family.dilation; a one-line error where the family cannot). drop_path: the stochastic depth
    rate of the deepest block, torchvision's linear schedule over the blocks kept (ConvNeXt,
    Swin, EfficientNet); None keeps torchvision's (ConvNeXt-T 0.1, Swin-T 0.2, EfficientNet 0.2).
    """
    layout = _layout(name)
    family = layout.family
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride!r} is not one of {OUTPUT_STRIDES}")
    if output_stride < 32 and family.dilation is None:
        raise ValueError(f"output_stride={output_stride}: {name} downsamples with layers that "
                         "have no dilated form (patchify convs / patch merging); use 32")
    missing = [level for level in levels if level not in layout.taps]
    if not levels or missing:
        raise ValueError(f"levels {sorted(levels)}: {name} has {list(layout.taps)}")
    net = _torchvision_net(name)
    if output_stride < 32:
        dilate_(net, layout.conv_strides, output_stride, family.dilation)
    if drop_path is not None:
        _set_drop_path(net, name, drop_path, layout.drop_path)
    return _extract(net, family, {layout.taps[level]: key for level, key in levels.items()})


def dilate_(net: nn.Module, conv_strides: dict[str, int], output_stride: int, rule: str) -> None:
    """Remove every stride 2 met at or below `output_stride` and dilate the convs after it, in
    place, so that each kernel still spans what it spanned in the undilated network.

    conv_strides: the stride of each conv's input in the undilated network (`_layout`). A kxk
    conv whose input stride S exceeds the output stride reads a map that is S / output_stride
    times denser than it was trained on, so it gets that dilation ("same" padding kept); a strided
    conv whose input already is at the output stride loses its stride. For a strided conv,
    rule "input" keeps the rate of its input (torchvision's ResNet: the first block's strided
    conv keeps the previous dilation, as in Chen et al.'s DeepLab) and "output" takes the rate
    of its output (torchvision's dilated MobileNetV3).
    """
    for path, m in net.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        stride_in = conv_strides[path]
        stride_out = stride_in * m.stride[0]
        if stride_out <= output_stride:
            continue
        if m.stride[0] > 1:  # only stride 2 stages are dilated: their input is at the output stride
            m.stride = (1, 1)
            rate = (stride_out if rule == "output" else stride_in) // output_stride
        else:
            rate = stride_in // output_stride
        if m.kernel_size != (1, 1):
            if m.padding != tuple((k - 1) // 2 for k in m.kernel_size) or m.dilation != (1, 1):
                raise ValueError(f"{path}: only undilated 'same' convs can be dilated")
            m.dilation = (rate, rate)
            m.padding = tuple(rate * (k - 1) // 2 for k in m.kernel_size)


def _set_drop_path(net: nn.Module, name: str, rate: float, default: float) -> None:
    """Scale torchvision's stochastic depth rates (linear in the block index) so that the
    largest is `rate`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path={rate!r} must be in [0, 1)")
    if default == 0.0:
        if rate > 0.0:
            raise ValueError(f"drop_path={rate!r}: {name} has no stochastic depth")
        return
    for m in net.modules():
        if isinstance(m, StochasticDepth):
            m.p = m.p * rate / default


def _extract(net: nn.Module, family: Family, return_nodes: dict[str, str]) -> fx.GraphModule:
    """The GraphModule that runs `net` up to the last requested node and returns them."""
    dual = create_feature_extractor(net, return_nodes,
                                    tracer_kwargs={"leaf_modules": list(family.blocks)},
                                    suppress_diff_warning=True)
    # Every train/eval difference lives in the leaves, so the two traces are one graph: keep it
    # as a plain GraphModule (a DualGraphModule regenerates its code on every mode switch).
    train, evaluate = (g.python_code("self").src for g in (dual.train_graph, dual.eval_graph))
    if train != evaluate:
        raise RuntimeError(f"{type(net).__name__}: train and eval traces differ; a module with "
                           "mode-dependent code is not a leaf")
    graph = dual.train_graph
    if family.nhwc:  # (B, H, W, C) -> (B, C, H, W)
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            outs = {k: graph.call_function(torch.permute, (v, (0, 3, 1, 2)))
                    for k, v in output.args[0].items()}
        output.args = (outs,)
    module = fx.GraphModule(dual, graph, f"{type(net).__name__}Features")
    # fx copies the modules the graph calls under plain nn.Module parents; a top-level child
    # whose every tensor is used goes back whole (so that backbone.layer4[0] indexes as in
    # torchvision). Both hold the same modules: the graph calls them by path either way.
    for name, child in list(module.named_children()):
        if set(child.state_dict()) == set(net.get_submodule(name).state_dict()):
            setattr(module, name, net.get_submodule(name))
    return module


def output_norms(name: str, levels: dict[str, str]) -> nn.ModuleDict | None:
    """A LayerNorm over the channels of each returned map, keyed like the encoder's outputs,
    for the families whose stage outputs are un-normalised (Family.norm_eps); else None. They
    start as the identity and are new layers, not part of the backbone's weights."""
    layout = _layout(name)
    eps = layout.family.norm_eps
    if eps is None:
        return None
    return nn.ModuleDict({key: convnext.LayerNorm2d(layout.channels[level], eps=eps)
                          for level, key in levels.items()})


def init_like_resnet_(module: nn.Module) -> None:
    """torchvision ResNet's init for new layers: He-normal (fan_out, relu) convs, zero biases,
    BatchNorm weight 1 / bias 0. ConvTranspose2d keeps PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_logits_(conv: nn.Conv2d) -> None:
    """N(0, 0.01) weights and zero bias for a conv that outputs logits (as mmsegmentation's heads):
    He init there gives logits of std ~10 and an initial loss far above log(num_classes)."""
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def from_torchvision_segmentation(state_dict: dict[str, torch.Tensor], backbone: str
                                  ) -> dict[str, torch.Tensor]:
    """A torchvision segmentation model's state_dict under seg's names. torchvision cuts the
    encoder of its MobileNetV3 models out of `.features` (keys `backbone.0.0.weight`); seg keeps
    the classification network's names (`backbone.features.0.0.weight`), into which the ImageNet
    weights load. Its ResNet models already have seg's names."""
    if _layout(backbone).family.body != ("features.*",):
        return dict(state_dict)
    return {f"backbone.features.{k[len('backbone.'):]}" if k.startswith("backbone.") else k: v
            for k, v in state_dict.items()}
