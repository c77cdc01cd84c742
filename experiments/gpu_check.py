"""GPU-ready in one call: correctness, speed, input pipeline and a short real run on one GPU,
sized for a short GPU lease (about 7 minutes with compilation; --budget_s moves it).

  python experiments/gpu_check.py --tiny --out=/tmp/gc           # toy sizes, any device, < 3 min
  python experiments/gpu_check.py --camvid_root=.gpu/camvid --out=/tmp/gc

Writes <out>/gpu_check.json (sections correctness, benchmark, loader, training, rewritten after
each) and <out>/gpu_check.md (the same as tables), <out>/train.log and the training run's
directory <out>/train. What each section does: seg/gpu_check.py; the plan (models, sizes,
budget): configs/benchmarks.py. A section that fails is recorded as failed and the rest run.

On a machine where only the checkout travels (64 MiB), with a python that has torch,
torchvision, numpy, absl-py and PyYAML but not ml-collections, prepare once, in the checkout
(both folders are git-ignored, so they travel only when named):

  mkdir -p .gpu && cp -r ../shared/datasets/camvid .gpu/camvid      # 27 MB
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0

(ml-collections is pure Python, py3-none-any; it needs absl-py and PyYAML, which are there). The
one command, carrying .whl and .gpu, copying back the small files:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
    && timeout 470 python3 experiments/gpu_check.py --camvid_root=.gpu/camvid --out=/tmp/gc; \
    cp /tmp/gc/gpu_check.json /tmp/gc/gpu_check.md /tmp/gc/train.log $OUT/

The seg package is not installed there: PYTHONPATH=$PWD makes it importable.
"""
from pathlib import Path

from absl import app, flags

from configs import benchmarks
from seg import cli, gpu_check
from seg.errors import ConfigError

_OUT = flags.DEFINE_string("out", None, "Output folder (created).")
_TINY = flags.DEFINE_bool("tiny", False, "Every section at toy sizes, on any device.")
_CAMVID = flags.DEFINE_string("camvid_root", None, "CamVid folder (the shared copy's layout); "
                              "default: the preset's ../shared/datasets/camvid, or a generated "
                              "dataset with --tiny.")
_BUDGET = flags.DEFINE_float("budget_s", None, "Seconds the sections may take (default: the "
                             "plan's, 430; 150 with --tiny).")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CAMVID.value and not Path(_CAMVID.value).is_dir():
        raise ConfigError(f"--camvid_root={_CAMVID.value!r} is not a folder")
    plan = benchmarks.gpu_check(tiny=_TINY.value, camvid_root=_CAMVID.value)
    if _BUDGET.value is not None:
        plan.budget_s = _BUDGET.value
    report = gpu_check.run(plan, _OUT.value)
    print(gpu_check.markdown(report))


if __name__ == "__main__":
    cli.run(main)
