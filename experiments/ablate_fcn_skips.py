"""FCN-32s against FCN-16s against FCN-8s (Long et al. 2015; seeds 001, 002): how much do the
pool4 and pool3 skips add? configs/fcn32s.py, fcn16s.py and fcn8s.py differ only in the skips
and the final upsampling (which each keeps bilinear and frozen, as the paper does).

  python experiments/ablate_fcn_skips.py --root=runs/ablate_fcn --steps=150
  python experiments/ablate_fcn_skips.py --root=runs/ablate_fcn --override=model.fc_channels=1024

Writes <root>/<variant>/seed<k> and <root>/summary.json (experiments/sweep.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from configs import fcn8s, fcn16s, fcn32s  # noqa: E402
from experiments import sweep  # noqa: E402


def variants(preset: str | None = None) -> dict:
    return {"fcn32s": fcn32s.get_config(preset), "fcn16s": fcn16s.get_config(preset),
            "fcn8s": fcn8s.get_config(preset)}


if __name__ == "__main__":
    sweep.main(variants)
