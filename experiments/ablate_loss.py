"""Cross-entropy against focal loss with gamma 0.5, 1 and 2 (seed 004's question: does focal
loss help the small object classes against the dominant background?).

  python experiments/ablate_loss.py --root=runs/ablate_loss --steps=300
  python experiments/ablate_loss.py --root=runs/ablate_loss_pets --preset=pets --model=pspnet

Focal loss with gamma 0 is the cross-entropy exactly (seg/losses.py), so the runs differ only
in how much confident pixels are down-weighted. Writes <root>/<variant>/seed<k> and
<root>/summary.json (experiments/sweep.py).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from absl import flags  # noqa: E402

from experiments import sweep  # noqa: E402

GAMMAS = (0.5, 1.0, 2.0)


def variants(preset: str | None = None, model: str = "pspnet") -> dict:
    try:
        get_config = importlib.import_module(f"configs.{model}").get_config
    except ModuleNotFoundError:
        raise ValueError(f"--model={model!r}: there is no configs/{model}.py") from None
    configs = {"cross_entropy": get_config(preset)}
    for gamma in GAMMAS:
        c = get_config(preset)
        c.loss.name, c.loss.gamma = "focal", gamma
        configs[f"focal_gamma{gamma:g}"] = c
    return configs


if __name__ == "__main__":
    flags.DEFINE_string("model", "pspnet", "The config whose loss is swept: configs/<model>.py.")
    sweep.main(lambda preset: variants(preset, flags.FLAGS.model))
