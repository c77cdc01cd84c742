"""Shared test helpers."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from seg.data.dataset import DatasetInfo, SegDataset

# The staged copies of the shared datasets sit beside the repository (CI checks them out
# there): the presets find them through SEG_DATASETS (seg/data/roots.py), unless the caller set
# it already. Tests that read them skip when the folder is absent.
os.environ.setdefault("SEG_DATASETS",
                      str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SHARED_DATASETS = Path(os.environ["SEG_DATASETS"])


def _randomise_bn(module: nn.Module) -> None:
    """Fresh BN (mean 0, var 1, weight 1, bias 0) is nearly the identity in eval mode, which
    would hide a BN applied at the wrong place or a statistic loaded into the wrong slot."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.fixture(scope="session")
def randomise_bn():
    return _randomise_bn


@pytest.fixture(scope="module")
def shared_synthetic_data():
    """Generates each synthetic split once per test module instead of once per run: every run
    of an end-to-end test builds all three splits, and most of that time is the generator
    drawing 256 images for the normalisation statistics."""
    import seg.data

    cache, build = {}, seg.data.build

    def cached(data_cfg, split):
        key = (json.dumps(data_cfg.to_dict(), sort_keys=True), split)
        if key not in cache:
            cache[key] = build(data_cfg, split)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seg.data, "build", cached)
        yield


def tiny_unet(**fields):
    """The tests' short UNet run on the generated data (32x32, 8 / 6 / 4 images, 3 steps);
    `fields` are dotted config keys with "__" for ".": tiny_unet(train__steps=4)."""
    from configs import unet
    from seg.config import set_field

    c = unet.get_config()
    c.model.base_channels, c.model.depth = 4, 2
    c.data.image_size, c.data.num_train, c.data.num_val, c.data.num_test = 32, 8, 6, 4
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = 3, 4, 6
    c.train.log_every, c.train.num_pictures = 3, 0
    for key, value in fields.items():
        set_field(c, key.replace("__", "."), value)
    return c


def trained_tiny_unet(tmp_path_factory, **fields) -> Path:
    """The workdir of a finished tiny_unet(**fields) run."""
    from seg import loop

    workdir = tmp_path_factory.mktemp("run") / "unet"
    loop.train_and_evaluate(tiny_unet(**fields), workdir)
    return workdir


@pytest.fixture(scope="module")
def one_thread():
    """In-process training on one thread: two OpenMP threads on a busy 2-core machine spin
    against each other and run 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- data: colour-coded samples

PALETTE = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]],
                       dtype=torch.uint8)   # far apart: blends never pass for another class
IGNORE_COLOUR = (128, 128, 128)


class ListDataset(SegDataset):
    """A split held as a list of (image, mask) pairs of any sizes."""

    def __init__(self, pairs, info: DatasetInfo):
        self.pairs, self.info = list(pairs), info

    def __len__(self):
        return len(self.pairs)

    def read(self, i):
        return self.pairs[i]

    def source(self, i):
        return f"pair{i}"


def palette_coded(masks, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> ListDataset:
    """Images whose pixel colour is PALETTE[label] (IGNORE_COLOUR where ignored)."""
    info = DatasetInfo("palette", tuple(f"c{k}" for k in range(len(PALETTE))), 255, mean, std)
    return ListDataset([(colour_of(m), m) for m in masks], info)


def colour_of(mask):
    table = torch.tensor(IGNORE_COLOUR, dtype=torch.uint8).repeat(256, 1)
    table[:len(PALETTE)] = PALETTE
    return table[mask.long()].permute(2, 0, 1).contiguous()


def decode(image):
    """uint8 (..., 3, H, W) -> (..., H, W) index of the nearest palette colour."""
    d = image.movedim(-3, -1)[..., None, :].float() - PALETTE.float()
    return (d * d).sum(-1).argmin(-1)


# ---------------------------------------------------------------- data: a folder dataset on disk

def write_folder_dataset(root, sizes: dict, num_classes: int = 3, seed: int = 0):
    """A dataset in the folder layout (seg/data/folder.py): for each split, images (JPEG) and
    masks (PNG) of the given (H, W) sizes, smooth enough that a model can learn a little, and a
    classes.json with the normalisation statistics. Returns the root."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    for split, shapes in sizes.items():
        for i, (h, w) in enumerate(shapes):
            ys, xs = np.mgrid[0:h, 0:w]
            cx, cy, r = g.uniform(0, w), g.uniform(0, h), g.uniform(4, max(5, min(h, w) / 2))
            mask = np.where((xs - cx) ** 2 + (ys - cy) ** 2 < r * r,
                            1 + (i % (num_classes - 1)), 0).astype(np.uint8)
            mask[0, :2] = 255
            image = np.clip(60 + 120 * (mask[..., None] > 0) * g.uniform(0.5, 1, 3)
                            + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            for folder, array, name in (("images", image, f"{i:03d}.jpg"),
                                        ("masks", mask, f"{i:03d}.png")):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / split / folder / name)
    meta = {"name": "discs", "classes": [f"c{k}" for k in range(num_classes)],
            "ignore_index": 255, "stats": {"train_rgb_mean": [0.4, 0.4, 0.4],
                                           "train_rgb_std": [0.25, 0.25, 0.25]}}
    (root / "classes.json").write_text(json.dumps(meta))
    return root


# ---------------------------------------------------------------- models: test-sized encoders

def _tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1),
                     CNBlockConfig(128, None, 2)], stochastic_depth_prob=0.1)


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    # two blocks in the first stage: the second one shifts its windows
    return SwinTransformer([4, 4], 16, [2, 1, 1, 1], [1, 2, 2, 4], [4, 4],
                           stochastic_depth_prob=0.2)


def _tiny_mobilenet_v3():
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as Block, MobileNetV3
    # (in, kernel, expanded, out, squeeze-excitation, activation, stride, dilation, width)
    return MobileNetV3([Block(8, 3, 8, 8, False, "RE", 1, 1, 1.0),
                        Block(8, 3, 16, 8, False, "RE", 2, 1, 1.0),
                        Block(8, 5, 24, 16, True, "RE", 2, 1, 1.0),
                        Block(16, 3, 32, 16, False, "HS", 2, 1, 1.0),
                        Block(16, 5, 48, 24, True, "HS", 2, 1, 1.0),
                        Block(24, 5, 48, 24, True, "HS", 1, 1, 1.0)], last_channel=64)


def _tiny_efficientnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig as Stage
    # (expansion, kernel, stride, in, out, blocks)
    return EfficientNet([Stage(1, 3, 1, 8, 8, 1), Stage(4, 3, 2, 8, 16, 1),
                         Stage(4, 5, 2, 16, 16, 2), Stage(4, 3, 2, 16, 24, 1),
                         Stage(4, 5, 2, 24, 32, 1)], dropout=0.2, stochastic_depth_prob=0.2,
                        last_channel=64)


# torchvision's own classes at test width and depth, standing in for the named networks
TINY_NETS = {"convnext_tiny": _tiny_convnext, "swin_t": _tiny_swin,
             "mobilenet_v3_large": _tiny_mobilenet_v3, "efficientnet_b0": _tiny_efficientnet}


@pytest.fixture
def tiny_encoders():
    """The networks of TINY_NETS are built at test width and depth from torchvision's own
    classes: the same code paths (blocks, stochastic depth, shifted windows, dilation, the
    encoder's graph) for a fraction of the build and compile time."""
    from seg.models import backbones

    original = backbones._torchvision_net
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "_torchvision_net",
                   lambda name: TINY_NETS[name]() if name in TINY_NETS else original(name))
        backbones._layout.cache_clear()
        yield
    backbones._layout.cache_clear()
