"""Where a dataset lives: data.root, or a folder of datasets named by one environment variable.

  data.root      the dataset's own folder; when set, it wins
  SEG_DATASETS   a folder holding one folder per dataset (as TORCH_HOME holds torch's weights);
                 with data.root unset, the dataset is read from $SEG_DATASETS/<data.dirname>

The default is resolved here, when a split is built, never when a config file is loaded: a
config can be written and checked on a machine without the data, and a missing dataset names
both the field and the variable. Readers call `root_dir` / `find_root`; a split that is not
there raises `MissingSplit`, which `data.test_optional` turns into "no test split".
"""
from __future__ import annotations

import os
from typing import Sequence

from seg.errors import DataError

ENV = "SEG_DATASETS"


class MissingSplit(DataError):
    """The split named by data.<role>_split is not in the dataset's folder."""


def dataset_root(data_cfg) -> str:
    """data.root, else $SEG_DATASETS/<data.dirname>; "" when neither says where."""
    if data_cfg.get("root"):
        return data_cfg.root
    datasets, dirname = os.environ.get(ENV, ""), data_cfg.get("dirname", "")
    return os.path.join(datasets, dirname) if datasets and dirname else ""


def root_dir(data_cfg, layout: str) -> str:
    """The dataset's folder, which must exist; `layout` says what it should hold."""
    root, dirname = dataset_root(data_cfg), data_cfg.get("dirname", "")
    fix = f"--config.data.root=<{layout}>"
    if dirname:
        fix += f" or {ENV}=<folder holding {dirname}/>"
    if not root:
        unset = f"data.root is not set and neither is ${ENV}" if dirname else \
            "data.root is not set"
        raise DataError(f"{unset}: data.name={data_cfg.name!r} needs {fix}")
    if not os.path.isdir(root):
        raise DataError(f"{describe(data_cfg, root)}: no such folder; set {fix}")
    return root


def find_root(data_cfg, candidates: Sequence[str], marker: str, layout: str) -> str:
    """The first of `candidates` (folders under the dataset's folder) holding `marker`."""
    root = root_dir(data_cfg, layout)
    for folder in candidates:
        if os.path.exists(os.path.join(root, folder, marker)):
            return os.path.join(root, folder) if folder else root
    searched = ", ".join(os.path.join(root, f, marker) for f in candidates)
    raise DataError(f"{describe(data_cfg, root)}: no {layout} found (searched {searched}); "
                    f"set --config.data.root")


def describe(data_cfg, root: str) -> str:
    """How the folder was chosen: the field, or the variable and data.dirname."""
    if data_cfg.get("root"):
        return f"data.root={root!r}"
    return f"{root!r} (${ENV}/<data.dirname={data_cfg.dirname!r}>; data.root unset)"


def split_folders(root: str, split_field: str, split: str, images: str, masks: str
                  ) -> tuple[str, str]:
    """(<root>/<images>/<split>, <root>/<masks>/<split>) of a dataset laid out by kind, then
    split (Cityscapes, ADE20K); a split that is not there names the splits that are."""
    image_dir, mask_dir = (os.path.join(root, kind, split) for kind in (images, masks))
    if not os.path.isdir(image_dir):
        there = sorted(os.listdir(os.path.join(root, images)))
        raise MissingSplit(f"{image_dir} not found: data.{split_field}={split!r} is not a "
                           f"split of {root} (splits there: {there})")
    return image_dir, mask_dir
