"""Dataset presets: `--config=configs/<model>.py:<preset>`, and where their data is found."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from configs import common, presets
from seg import data
from seg.data import roots

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py")
                       if p.stem not in ("__init__", "common", "presets", "ablations",
                                         "benchmarks"))
FOLDERS = {"camvid": "camvid", "camvid_cpu": "camvid", "membrane": "membrane", "bagdata": "bagdata", "voc": "VOCdevkit",
           "pets": "oxford-iiit-pet", "cityscapes": "cityscapes",
           "ade20k": "ADEChallengeData2016"}


def preset(name):
    return presets.apply(common.get_base_config(), name)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_name_a_folder_never_a_path(name):
    """No preset points into the source tree or anywhere else: data.root stays unset and the
    dataset is found under $SEG_DATASETS at build time."""
    c = preset(name)
    assert c.data.root is None and c.data.dirname == FOLDERS[name]


def test_the_root_is_resolved_when_the_data_is_opened(tmp_path, monkeypatch):
    c = preset("membrane").data
    monkeypatch.setenv(roots.ENV, str(tmp_path / "datasets"))
    assert roots.dataset_root(c) == str(tmp_path / "datasets" / "membrane")
    c.root = str(tmp_path / "mine")                     # the field wins over the variable
    assert roots.dataset_root(c) == str(tmp_path / "mine")
    monkeypatch.delenv(roots.ENV)
    c.root = None
    assert roots.dataset_root(c) == ""


def test_a_missing_dataset_names_the_field_and_the_variable(tmp_path, monkeypatch):
    c = preset("cityscapes").data
    monkeypatch.delenv(roots.ENV, raising=False)
    with pytest.raises(data.DataError) as e:
        data.build(c, "train")
    assert str(e.value) == (
        "data.root is not set and neither is $SEG_DATASETS: data.name='cityscapes' needs "
        "--config.data.root=<Cityscapes folder with leftImg8bit/ and gtFine/> or "
        "SEG_DATASETS=<folder holding cityscapes/>")
    monkeypatch.setenv(roots.ENV, str(tmp_path))
    with pytest.raises(data.DataError) as e:
        data.build(c, "train")
    assert str(e.value) == (
        f"'{tmp_path / 'cityscapes'}' ($SEG_DATASETS/<data.dirname='cityscapes'>; data.root "
        f"unset): no such folder; set --config.data.root=<Cityscapes folder with leftImg8bit/ "
        f"and gtFine/> or SEG_DATASETS=<folder holding cityscapes/>")
    c.root = str(tmp_path / "nope")
    with pytest.raises(data.DataError, match=rf"^data.root='{tmp_path / 'nope'}': no such "
                                             rf"folder; set --config.data.root="):
        data.build(c, "train")


@pytest.mark.parametrize("module", MODEL_CONFIGS)
@pytest.mark.parametrize("name, reader, num_classes, test_split", [
    ("camvid", "camvid", 11, "test"), ("camvid_cpu", "camvid", 11, "test"),
    ("membrane", "folder", 2, "test"),
    ("bagdata", "folder", 2, "test"), ("voc", "voc", 21, ""), ("pets", "pets", 3, "test"),
    ("cityscapes", "cityscapes", 19, ""), ("ade20k", "ade20k", 150, ""),
])
def test_every_model_config_takes_every_preset(module, name, reader, num_classes, test_split):
    get_config = importlib.import_module(f"configs.{module}").get_config
    c, plain = get_config(name), get_config(None)
    assert (c.data.name, c.data.num_classes, c.data.test_split) == (reader, num_classes,
                                                                      test_split)
    assert c.loss.ignore_index == c.data.ignore_index == 255
    assert c.model == plain.model                       # a preset never touches the model
    if name not in presets.RECIPES:                     # nor, but for the recipes, the optimizer
        assert c.optimizer == plain.optimizer and c.schedule == plain.schedule
    assert plain == get_config("") and plain.data.name == "synthetic"


def test_presets_set_the_augmentation_the_dataset_needs():
    camvid, pets, voc = preset("camvid"), preset("pets"), preset("voc")
    assert camvid.data.crop_size == (352, 480) and camvid.data.scale_range == (0.5, 2.0)
    assert camvid.data.test_split == "test" and camvid.data.test_optional
    assert voc.data.crop_size == (512, 512) and voc.data.normalize == "imagenet"
    assert (pets.data.resize, pets.data.crop_size) == (256, (224, 224))
    assert pets.data.perspective > 0 and pets.data.color_jitter > 0
    assert preset("membrane").loss.name == preset("bagdata").loss.name == "cross_entropy"
    assert preset("membrane").train.batch_size < preset("bagdata").train.batch_size


# mmsegmentation 1.2.2's configs for the R50-D8 models, read field by field: the dataset's base
# config (crop_size, RandomResize scale and ratio_range, RandomCrop cat_max_ratio, test Resize
# scale), the schedule (max_iters, SGD lr / momentum / weight_decay, PolyLR power / eta_min),
# the model (auxiliary loss_weight 0.4, test_cfg mode 'whole') and the model config's name
# (GPUs x images per GPU).
REFERENCE = {
    "cityscapes": dict(crop=(512, 1024), box=(2048, 1024), steps=40_000, batch=4 * 2),
    "ade20k": dict(crop=(512, 512), box=(2048, 512), steps=80_000, batch=4 * 4),
    "voc": dict(crop=(512, 512), box=(2048, 512), steps=20_000, batch=4 * 4),
}


@pytest.mark.parametrize("name", presets.RECIPES)
def test_recipe_presets_are_the_reference_configs(name):
    ref, c = REFERENCE[name], preset(name)
    assert (c.data.crop_size, c.data.scale_to, c.eval.scale_to) == (ref["crop"], ref["box"],
                                                                    ref["box"])
    assert (c.train.steps, c.train.batch_size) == (ref["steps"], ref["batch"])
    assert (c.data.scale_range, c.data.crop_max_class_ratio) == ((0.5, 2.0), 0.75)
    assert c.data.hflip and c.data.photometric and c.data.normalize == "imagenet"
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.momentum, c.optimizer.nesterov,
            c.optimizer.weight_decay) == ("sgd", 0.01, 0.9, False, 5e-4)
    assert (c.schedule.name, c.schedule.power, c.schedule.end_lr,
            c.schedule.warmup_steps) == ("poly", 0.9, 1e-4, 0)
    assert (c.loss.name, c.loss.aux_weight) == ("cross_entropy", 0.4)
    assert (c.eval.mode, c.eval.flip, c.eval.scales) == ("whole", False, (1.0,))
    assert c.train.eval_every == c.train.checkpoint_every == ref["steps"] // 10
    assert c.train.sync_bn and c.data.pad_multiple == 1


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset preset 'mapillary'.*valid: camvid, "
                                         "camvid_cpu, membrane, bagdata, voc, pets, "
                                         "cityscapes, ade20k"):
        preset("mapillary")


@pytest.mark.parametrize("name, layout", [("voc", "VOCdevkit/VOC2012"), ("pets", "Pet")])
def test_voc_and_pets_need_a_root(name, layout, monkeypatch):
    monkeypatch.delenv(roots.ENV, raising=False)
    with pytest.raises(data.DataError,
                       match=f"data.root is not set.*--config.data.root=.*{layout}"):
        data.build(preset(name).data, "train")
