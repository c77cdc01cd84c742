"""UNet on a binary task (seed 003): bilinear against transposed-conv upsampling, crossed with
BCE against BCE + (1 - soft IoU), four variants.

  python experiments/ablate_unet.py --root=runs/ablate_unet --steps=200
  python experiments/ablate_unet.py --root=runs/ablate_unet_membrane --preset=membrane

Without a preset the embedded data runs with two classes (background against one object
class); a preset must give a binary dataset (the binary losses refuse others). Writes
<root>/<variant>/seed<k> and <root>/summary.json (experiments/sweep.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from configs import unet  # noqa: E402
from experiments import sweep  # noqa: E402


def variants(preset: str | None = None) -> dict:
    configs = {}
    for upsampling in ("transposed", "bilinear"):
        for loss in ("bce", "bce_soft_iou"):
            c = unet.get_config(preset)
            if preset is None:
                c.data.num_classes = 2
            c.model.bilinear = upsampling == "bilinear"
            c.loss.name = loss
            configs[f"{upsampling}-{loss}"] = c
    return configs


if __name__ == "__main__":
    sweep.main(variants)
