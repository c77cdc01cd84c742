"""What the speed tools measure: the models of experiments/benchmark.py, the input pipeline of
experiments/loader_bench.py, and the plan of experiments/gpu_check.py (seg/gpu_check.py runs it).
"""
from __future__ import annotations

import ml_collections

from configs import (backbone_unet, common, deeplabv3, deeplabv3plus, fcn8s, fcn_resnet50, fpn,
                     lraspp, presets, pspnet, unet, upernet)

# name: (label, config module, model overrides): the papers' networks
MODELS = {
    "fcn8s": ("FCN-8s, VGG-16", fcn8s, {}),
    "unet": ("UNet", unet, {}),
    "pspnet": ("PSPNet-R50", pspnet, {"backbone": "resnet50"}),
    "deeplabv3": ("DeepLabV3-R50", deeplabv3, {"backbone": "resnet50"}),
    "fcn_resnet50": ("FCN-R50", fcn_resnet50, {}),
    "deeplabv3plus": ("DeepLabV3+-R50", deeplabv3plus, {"backbone": "resnet50"}),
    "upernet": ("UPerNet-R50", upernet, {"backbone": "resnet50"}),
    "upernet_convnext": ("UPerNet-ConvNeXt-T", upernet, {"backbone": "convnext_tiny"}),
    "upernet_swin": ("UPerNet-Swin-T", upernet, {"backbone": "swin_t"}),
    "fpn": ("SemanticFPN-R50", fpn, {"backbone": "resnet50"}),
    "lraspp": ("LR-ASPP-MobileNetV3-L", lraspp, {}),
    "backbone_unet": ("UNet-decoder-R34", backbone_unet, {}),
}


# train.num_seeds benchmarks (experiments/benchmark.py --vmap_seeds): small models at CamVid's
# 11 classes, what several seeds of one config leave of a device otherwise idle
VMAP_MODELS = {"unet": ("UNet, base 16", unet, {"base_channels": 16}),
               "pspnet": ("PSPNet-R18", pspnet, {"backbone": "resnet18"})}


def vmap_model(name: str, precision: str = "fp32", channels_last: bool = False,
               compile=False) -> tuple[str, ml_collections.ConfigDict]:
    """(label, config) of a --vmap_seeds model at the given fast-path settings."""
    label, module, overrides = VMAP_MODELS[name]
    cfg = module.get_config()
    cfg.model.update(overrides)
    cfg.data.num_classes = 11
    cfg.train.update(precision=precision, channels_last=channels_last, compile=compile)
    return label, cfg


def model(name: str, num_classes: int = 21) -> tuple[str, ml_collections.ConfigDict]:
    """(label, experiment config) of a benchmark model; 21 classes: PASCAL VOC's. The schedule
    is constant: the torch.optim loops it is timed against have no scheduler."""
    label, module, overrides = MODELS[name]
    cfg = module.get_config()
    cfg.model.update(overrides)
    cfg.data.num_classes = num_classes
    cfg.schedule.name = "constant"
    return label, cfg


def camvid(root: str | None = None) -> ml_collections.ConfigDict:
    """The CamVid preset at full 360x480 crops with its whole train augmentation (scale 0.5-2,
    flips) plus colour jitter 0.4: the input pipeline at its most expensive."""
    c = presets.apply(common.get_base_config(), "camvid")
    if root:
        c.data.root = root
    c.data.crop_size = (360, 480)
    c.data.color_jitter = 0.4
    return c


def _tiny_data(c: ml_collections.ConfigDict) -> None:
    """A generated dataset of 32x32 images in place of CamVid (nothing to copy)."""
    c.data.update(name="synthetic", num_classes=3, image_size=32, num_train=16, num_val=8,
                  num_test=0, test_split="", crop_size=(), scale_range=(1.0, 1.0),
                  color_jitter=0.0, workers=0)


def gpu_check(tiny: bool = False, camvid_root: str | None = None) -> ml_collections.ConfigDict:
    """The plan of experiments/gpu_check.py: one run of at most ~8 minutes on one GPU.

    tiny: every section at toy sizes (on any device; a generated dataset unless camvid_root is
    given), so that the whole script is known to work before a GPU is booked."""
    p = ml_collections.ConfigDict()
    p.tiny = tiny
    p.device = "auto"             # auto: cuda when available
    p.budget_s = 150.0 if tiny else 430.0   # the sections stop starting work past this
    # inductor on CUDA; on CPU dynamo's graph capture with eager kernels ("eager"): the same
    # graph-count and recompilation checks, without minutes of C++ compilation
    p.compile_backend = "auto"

    k = p.correctness = ml_collections.ConfigDict()
    k.models = ml_collections.ConfigDict()   # functional step vs nn.Module + torch.optim
    unet_small = unet.get_config()
    unet_small.model.update(base_channels=4 if tiny else 16, depth=2 if tiny else 3)
    psp_small = pspnet.get_config()     # ResNet-18 PSPNet: BatchNorm, dilation, aux head
    psp_small.optimizer.update(name="sgd", lr=0.05)
    for cfg in (unet_small, psp_small):
        cfg.data.num_classes = 3
        cfg.schedule.name = "constant"
    k.models.unet = unet_small
    k.models.pspnet_r18 = psp_small
    k.image_size, k.batch_size, k.steps = (32, 2, 3) if tiny else (128, 4, 5)
    k.compile_steps = 20          # the compiled step must not recompile over these
    # the optimizers are compared on the parameter shapes of this model
    k.optimizer_model = unet_small.model if tiny else pspnet.get_config().model
    if not tiny:
        k.optimizer_model.backbone = "resnet50"
    k.optimizer_steps = 10

    b = p.benchmark = ml_collections.ConfigDict()
    b.models, b.labels = ml_collections.ConfigDict(), ml_collections.ConfigDict()
    names = ("unet",) if tiny else ("pspnet", "deeplabv3", "unet", "fcn8s")   # in this order
    for name in names:
        b.labels[name], b.models[name] = model(name)
        if tiny:
            b.models[name].model.update(base_channels=4, depth=2)
    b.modes = ("imperative", "eager", "fast")
    b.batch_size, b.image_size = (2, 32) if tiny else (16, 512)
    b.rounds, b.steps, b.warmup = (2, 1, 2) if tiny else (5, 3, 2)
    b.model_budget_s = 0.0 if tiny else 60.0   # a model is skipped when less time is left
    b.matmul_size = 256 if tiny else 8192      # the bf16 matmul that measures the peak
    # train.num_seeds: one vmapped step of K members against K steps in turn (seg/seeds_bench.py)
    v = b.vmap_seeds = ml_collections.ConfigDict()
    v.models, v.labels = ml_collections.ConfigDict(), ml_collections.ConfigDict()
    for name in ("unet",) if tiny else ("unet", "pspnet"):
        v.labels[name], v.models[name] = vmap_model(name, precision="bf16", channels_last=True)
        if tiny:
            v.models[name].model.update(base_channels=4, depth=2)
    v.num_seeds = (2,) if tiny else (2, 4, 8)
    v.batch_size, v.crop = (2, (32, 32)) if tiny else (8, (176, 240))   # per member
    v.rounds = 2 if tiny else 5
    v.model_budget_s = 0.0 if tiny else 30.0

    d = p.loader = ml_collections.ConfigDict()
    loader_cfg = camvid(camvid_root)
    if tiny and not camvid_root:
        _tiny_data(loader_cfg)
    elif tiny:
        loader_cfg.data.crop_size = (64, 64)
    d.data = loader_cfg.data
    d.batch_size = 4 if tiny else 16
    d.workers = (0, 1) if tiny else (0, 4, 8, 12)
    d.steps, d.warmup = (3, 1) if tiny else (20, 3)
    d.reserve_s = 5.0 if tiny else 30.0        # kept for this section by the ones before

    t = p.training = ml_collections.ConfigDict()
    run = unet.get_config() if tiny else pspnet.get_config("camvid")
    if tiny:
        run.model.update(base_channels=4, depth=2)
        if camvid_root:
            run = unet.get_config("camvid")
            run.model.update(base_channels=4, depth=2)
            run.data.update(root=camvid_root, crop_size=(64, 64), workers=1)
        else:
            _tiny_data(run)
        run.train.update(steps=4, batch_size=4, eval_batch_size=8, log_every=2, eval_every=4,
                         checkpoint_every=4)
    else:
        run.data.root = camvid_root or run.data.root
        run.model.backbone = "resnet50"
        run.train.update(batch_size=16, eval_batch_size=16, log_every=25)
    run.train.update(channels_last=True, precision="bf16", num_pictures=0, keep_checkpoints=1)
    t.config = run
    # steps: as many as the time left allows at the speed the benchmark and loader measured
    # (at least min_steps); the run is stopped at the budget's end regardless
    t.fit_steps = not tiny
    t.min_steps, t.max_steps, t.evals = 100, 3000, 2
    t.compile_allowance_s = 90.0    # compiling the train and eval steps, cuDNN autotuning
    t.reserve_s = 20.0 if tiny else 130.0
    return p
