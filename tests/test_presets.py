"""Dataset presets: `--config=configs/<model>.py:<preset>`."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from configs import common, presets
from seg import data

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py")
                       if p.stem not in ("__init__", "common", "presets", "ablations",
                                         "benchmarks"))


def test_shared_roots_sit_next_to_the_repo():
    assert presets.SHARED == REPO.parent / "shared" / "datasets" and presets.SHARED.is_absolute()
    for name in ("camvid", "membrane", "bagdata"):
        assert presets.apply(common.get_base_config(), name).data.root == \
            str(REPO.parent / "shared" / "datasets" / name)


@pytest.mark.parametrize("module", MODEL_CONFIGS)
@pytest.mark.parametrize("preset, name, num_classes, test_split", [
    ("camvid", "camvid", 11, ""), ("membrane", "folder", 2, "test"),
    ("bagdata", "folder", 2, "test"), ("voc", "voc", 21, ""), ("pets", "pets", 3, "test"),
])
def test_every_model_config_takes_every_preset(module, preset, name, num_classes, test_split):
    get_config = importlib.import_module(f"configs.{module}").get_config
    c, plain = get_config(preset), get_config(None)
    assert (c.data.name, c.data.num_classes, c.data.test_split) == (name, num_classes, test_split)
    assert c.loss.ignore_index == c.data.ignore_index == 255
    assert c.model == plain.model and c.optimizer == plain.optimizer   # the model is untouched
    assert plain == get_config("") and plain.data.name == "synthetic"


def test_presets_set_the_augmentation_the_dataset_needs():
    get = lambda name: presets.apply(common.get_base_config(), name)
    camvid, pets, voc = get("camvid"), get("pets"), get("voc")
    assert camvid.data.crop_size == (352, 480) and camvid.data.scale_range == (0.5, 2.0)
    assert voc.data.crop_size == (512, 512) and voc.data.normalize == "imagenet"
    assert (pets.data.resize, pets.data.crop_size) == (256, (224, 224))
    assert pets.data.perspective > 0 and pets.data.color_jitter > 0
    assert get("membrane").loss.name == get("bagdata").loss.name == "cross_entropy"
    assert get("membrane").train.batch_size < get("bagdata").train.batch_size


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset preset 'cityscapes'.*valid: camvid, "
                                         "membrane, bagdata, voc, pets"):
        presets.apply(common.get_base_config(), "cityscapes")


@pytest.mark.parametrize("preset, layout", [("voc", "VOCdevkit/VOC2012"), ("pets", "Pet")])
def test_voc_and_pets_need_a_root(preset, layout):
    c = presets.apply(common.get_base_config(), preset)
    assert c.data.root is None
    with pytest.raises(data.DataError,
                       match=f"data.root is not set.*--config.data.root=.*{layout}"):
        data.build(c.data, "train")
