"""PSPNet's design choices (Zhao et al. 2017), one at a time from configs/pspnet.py: pyramid
bins {1} against {1, 2, 3, 6}, max against average pooling, no auxiliary head against the
auxiliary loss at weight 0.4, and a frozen encoder against a trained one.

  python experiments/ablate_pspnet.py --root=runs/ablate_pspnet --steps=300

"aux_0" drops the auxiliary head (model.aux=False, loss.aux_weight=0): the main network is the
same. "frozen_backbone" trains only the pyramid and the heads; from a random init (the default:
no ImageNet weights on these machines) the encoder then gives random features, so it measures
what the head alone learns; add --override=model.backbone_weights=IMAGENET1K_V1 for the
pretrained case. Writes <root>/<variant>/seed<k> and <root>/summary.json (experiments/sweep.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from configs import pspnet  # noqa: E402
from experiments import sweep  # noqa: E402

CHANGES = {
    "baseline": {},
    "bins_1": {"model.bins": (1,)},
    "pool_max": {"model.pool": "max"},
    "aux_0": {"model.aux": False, "loss.aux_weight": 0.0},
    "frozen_backbone": {"train.freeze": ("backbone",)},
}


def variants(preset: str | None = None) -> dict:
    configs = {}
    for name, changes in CHANGES.items():
        configs[name] = c = pspnet.get_config(preset)
        for key, value in changes.items():
            sweep.set_field(c, key, value)
    return configs


if __name__ == "__main__":
    sweep.main(variants)
