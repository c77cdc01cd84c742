"""The ablation studies (configs/ablations.py) swept end to end on tiny settings, in-process
(seg/sweep.py): one run directory per variant and seed, summary.json with mean / std matching
the runs' own summaries, reuse of finished runs; and the command line (experiments/ablate.py)."""
from __future__ import annotations

import json
import statistics

import pytest

from configs import ablations
from seg import compare, config, errors, experiment, loop, sweep

TINY = ["data.image_size=32", "data.num_train=8", "data.num_val=4", "data.num_test=4",
        "train.batch_size=2", "train.eval_batch_size=4", "train.num_pictures=0"]
SCRIPTS = {
    "loss": (lambda: ablations.variants("loss", model="unet"),
             ["model.base_channels=8", "model.depth=2"]),
    "unet": (lambda: ablations.variants("unet"), ["model.base_channels=8", "model.depth=2"]),
    "fcn": (lambda: ablations.variants("fcn_skips"),
            ["model.backbone=vgg11", "model.fc_channels=16"]),
    "pspnet": (lambda: ablations.variants("pspnet"), ["model.output_stride=32"]),
}
pytestmark = pytest.mark.usefixtures("shared_synthetic_data", "one_thread")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sweep_writes_runs_and_mean_std(script, tmp_path, capsys):
    make, extra = SCRIPTS[script]
    configs = make()
    result = sweep.run_sweep(configs, tmp_path, seeds=[0, 1], steps=2, overrides=TINY + extra)
    assert json.loads((tmp_path / "summary.json").read_text()) == result
    assert set(result["variants"]) == set(configs)
    for name, v in result["variants"].items():
        summaries = [json.loads((tmp_path / name / f"seed{k}" / "summary.json").read_text())
                     for k in (0, 1)]
        assert [s["steps"] for s in summaries] == [2, 2]
        val = [s["last_eval"]["val"]["miou"] for s in summaries]
        test = [s["last_eval"]["test"]["miou"] for s in summaries]
        assert v["val_miou"] == {"mean": pytest.approx(statistics.fmean(val)),
                                 "std": pytest.approx(statistics.stdev(val)), "n": 2}
        assert v["test_miou"]["mean"] == pytest.approx((test[0] + test[1]) / 2)
        assert v["train_time_s"]["n"] == 2 and v["train_time_s"]["mean"] > 0
        assert [r["seed"] for r in v["runs"]] == [0, 1]
    table = sweep.markdown_table(result)
    assert table.count("\n") == len(configs) + 1
    first = next(iter(configs))
    assert f"| {first} | {result['variants'][first]['val_miou']['mean']:.4f} ± " in table
    # every variant against the first: the paired bootstrap over both seeds' per-image results
    assert result["baseline"] == first
    assert result["variants"][first]["vs_baseline"] == {}
    name, v = list(result["variants"].items())[1]
    got = v["vs_baseline"]["test"]["miou"]
    again = compare.paired_bootstrap(compare.load([tmp_path / first / f"seed{k}" for k in (0, 1)],
                                                  "test"),
                                     compare.load([tmp_path / name / f"seed{k}" for k in (0, 1)],
                                                  "test"))
    assert got == again._asdict()
    assert got["diff"] == pytest.approx(v["test_miou"]["mean"]
                                        - result["variants"][first]["test_miou"]["mean"],
                                        abs=1e-12)  # the mean over seeds of each side
    assert f"| {first} |" in table and "| baseline |" in table


def test_finished_runs_are_read_not_trained_again(tmp_path, monkeypatch):
    configs = ablations.variants("unet")
    overrides = TINY + SCRIPTS["unet"][1]
    first = sweep.run_sweep(configs, tmp_path, seeds=[3], steps=1, overrides=overrides)
    log = tmp_path / "bilinear-bce" / "seed3" / "metrics.jsonl"
    before = log.read_text()

    def no_training(cfg, workdir):
        raise AssertionError(f"{workdir} trained again")

    monkeypatch.setattr(loop, "train_and_evaluate", no_training)
    again = sweep.run_sweep(configs, tmp_path, seeds=[3], steps=1, overrides=overrides)
    assert again["variants"] == first["variants"] and log.read_text() == before
    with pytest.raises(errors.ConfigError, match="another config"):  # a changed config is refused
        sweep.run_sweep(configs, tmp_path, seeds=[3], steps=2, overrides=overrides)


def test_overrides():
    assert config.parse_override("train.steps=5") == ("train.steps", 5)
    assert config.parse_override("model.bins=(1,2)") == ("model.bins", (1, 2))
    assert config.parse_override("train.compile=true") == ("train.compile", True)
    assert config.parse_override("model.backbone=resnet18") == ("model.backbone", "resnet18")
    with pytest.raises(ValueError, match="key=value"):
        config.parse_override("train.steps")
    configs = ablations.variants("loss", model="unet")
    runs = sweep.plan(configs, [0, 4], steps=7,
                      overrides=["data.ignore_index=7", "train.freeze=['inc']"])
    assert [(name, seed) for name, seed, _ in runs][:3] == [
        ("cross_entropy", 0), ("cross_entropy", 4), ("focal_gamma0.5", 0)]
    _, _, cfg = runs[3]
    assert (cfg.seed, cfg.train.steps, cfg.loss.name, cfg.loss.gamma) == (4, 7, "focal", 0.5)
    assert cfg.loss.ignore_index == 7 and cfg.train.freeze == ("inc",)  # references still linked
    assert configs["focal_gamma0.5"].seed == 0 and configs["focal_gamma0.5"].train.steps == 1000
    assert sweep.swept_fields(configs) == {"loss.name", "loss.gamma"}
    with pytest.raises(ValueError, match="--override sets loss.gamma, which the sweep varies"):
        sweep.plan(configs, [0], overrides=["loss.gamma=3.0"])
    with pytest.raises(ValueError, match="--override model.nope=1: no such field"):
        sweep.plan(configs, [0], overrides=["model.nope=1"])
    with pytest.raises(ValueError, match="train.steps"):
        sweep.plan(configs, [0], overrides=["train.steps=many"])


def test_aggregate():
    assert sweep.aggregate([0.5, None, 0.7, float("nan")]) == {
        "mean": pytest.approx(0.6), "std": pytest.approx(0.1414213562), "n": 2}
    assert sweep.aggregate([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    assert sweep.aggregate([None]) == {"mean": None, "std": None, "n": 0}


def test_backbones_study_varies_the_encoder_of_any_head():
    configs = ablations.variants("backbones", model="deeplabv3")   # output stride 8
    assert list(configs) == ["resnet18", "mobilenet_v3_large", "efficientnet_b0",
                             "regnet_y_400mf", "convnext_tiny-os32", "swin_t-os32"]
    assert sweep.swept_fields(configs) == {"model.backbone", "model.output_stride"}
    for c in configs.values():
        experiment.check(c)  # every variant builds (on the meta device) before any trains
    assert sweep.swept_fields(ablations.variants("backbones")) == {"model.backbone"}  # UPerNet
    with pytest.raises(errors.ConfigError, match="no model.backbone"):
        ablations.variants("backbones", model="unet")
    with pytest.raises(errors.ConfigError, match="--model applies to"):
        ablations.variants("pspnet", model="upernet")


def test_recipe_study_undoes_one_choice_of_the_camvid_recipe_at_a_time():
    configs = ablations.variants("recipe", "camvid_cpu")
    assert list(configs) == ["recipe", "no_balance", "no_rescale", "lr_div5"]
    base = configs["recipe"]
    assert (base.model.name, base.loss.class_balance) == ("pspnet", "median_frequency")
    assert base.data.scale_range == (0.5, 2.0) and base.optimizer.lr == 0.05
    assert configs["no_balance"].loss.class_balance == ""
    assert configs["no_rescale"].data.scale_range == (1.0, 1.0)
    assert configs["lr_div5"].optimizer.lr == pytest.approx(0.01)
    assert sweep.swept_fields(configs) == {"loss.class_balance", "data.scale_range",
                                           "optimizer.lr"}


def test_variants_keeps_the_named_ones_in_the_study_order():
    assert list(ablations.variants("pspnet", only=["aux_0", "baseline"])) == ["baseline", "aux_0"]
    with pytest.raises(errors.ConfigError, match=r"--variants: 'bins_3' not in --study='pspnet' "
                                                 r"\(baseline, bins_1, "):
        ablations.variants("pspnet", only=["baseline", "bins_3"])
