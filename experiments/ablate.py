"""Runs an ablation study (configs/ablations.py): every variant with every seed, one ordinary
run directory each, then the mean and standard deviation over the seeds per variant.

  python experiments/ablate.py --study=pspnet --root=runs/ablate_pspnet --steps=300
  python experiments/ablate.py --study=loss --model=unet --root=runs/ablate_loss --seeds=0,1,2
  python experiments/ablate.py --study=backbones --model=deeplabv3plus --root=runs/ablate_enc
  python experiments/ablate.py --study=fcn_skips --root=runs/ablate_fcn \
      --override=model.fc_channels=1024
  python experiments/ablate.py --study=unet --preset=membrane --root=runs/ablate_unet
  python experiments/ablate.py --study=loss --model=unet --root=runs/ablate_loss \
      --seeds=0,1,2 --vmap
  python experiments/ablate.py --study=pspnet --preset=camvid_cpu --root=runs/psp_camvid \
      --variants=baseline,bins_1,aux_0 --steps=300

Writes <root>/<variant>/seed<k>/ and <root>/summary.json, and prints the summary as a markdown
table: mean and standard deviation over the seeds, and each variant's val mIoU difference from
--baseline with its 95% paired-bootstrap interval over images and seeds (seg/compare.py). Runs
already finished with the same config are read back, unfinished ones resume. With --vmap the
seeds of a variant train together as one run of train.num_seeds in <root>/<variant>, whose
members are the same <root>/<variant>/seed<k> directories.
"""
from absl import app, flags

from configs import ablations
from seg import cli, sweep

_STUDY = flags.DEFINE_enum("study", None, list(ablations.STUDIES), "The study to run.")
_MODEL = flags.DEFINE_string("model", None, "--study=loss / backbones / recipe: the base "
                             "config, configs/<model>.py (default pspnet / upernet / pspnet).")
_PRESET = flags.DEFINE_string("preset", None, "Dataset preset of every config (camvid, "
                              "membrane, ...); default: the embedded data.")
_STEPS = flags.DEFINE_integer("steps", None, "Train steps of every run (default: the config's).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (config.seed) each variant runs with.")
_ROOT = flags.DEFINE_string("root", None, "Sweep directory (<root>/<variant>/seed<k>).")
_BASELINE = flags.DEFINE_string("baseline", None, "The variant the others are compared with "
                                "(default: the study's first).")
_VARIANTS = flags.DEFINE_list("variants", None, "Run only these variants of the study "
                              "(default: all); --baseline must be one of them.")
_VMAP = flags.DEFINE_bool("vmap", False, "Train all seeds of a variant at once, as one run of "
                          "train.num_seeds (seg/seeds.py); the seeds must be consecutive.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "key=value set in every run's config, "
                                      "e.g. --override=train.batch_size=4 (repeatable).")
flags.mark_flags_as_required(["study", "root"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    configs = ablations.variants(_STUDY.value, _PRESET.value, _MODEL.value, _VARIANTS.value)
    print(sweep.sweep_and_report(configs,
                                 _ROOT.value, _SEEDS.value, _STEPS.value, _OVERRIDE.value,
                                 _BASELINE.value, vmap=_VMAP.value))


if __name__ == "__main__":
    cli.run(main)
