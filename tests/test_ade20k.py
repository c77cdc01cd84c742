"""ADE20K: a miniature ADEChallengeData2016 in the official layout and file names (images of
several sizes, values 0-150), read with reduce_zero_label and trained for two steps with the
`ade20k` preset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import deeplabv3
from seg import data, loop
from seg.data import roots

SIZES = {"training": [(40, 56), (48, 40), (40, 56)], "validation": [(40, 56), (36, 44)]}
PREFIX = {"training": "ADE_train", "validation": "ADE_val"}


def annotation(seed: int, h: int, w: int) -> np.ndarray:
    """Blocks of values 0-150: 0 (other, ignored), 1 and 150 (the first and last classes)."""
    g = np.random.default_rng(seed)
    values = g.choice([0, 1, 2, 13, 75, 149, 150], size=(-(-h // 4), -(-w // 4)))
    return values.repeat(4, 0).repeat(4, 1)[:h, :w].astype(np.uint8)


def write_ade20k(root: Path) -> Path:
    """<root>/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*_<n>.jpg|png,
    with the list files of the release beside them."""
    ade = root / "ADEChallengeData2016"
    for split, sizes in SIZES.items():
        for n, (h, w) in enumerate(sizes, 1):
            stem = f"{PREFIX[split]}_{n:08d}"
            seed = 100 * (split == "validation") + n
            for kind, array, ext in (
                    ("images", np.random.default_rng(seed).integers(0, 256, (h, w, 3),
                                                                    dtype=np.uint8), "jpg"),
                    ("annotations", annotation(seed, h, w), "png")):
                (ade / kind / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(ade / kind / split / f"{stem}.{ext}")
    (ade / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n")
    (ade / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_ade20k(tmp_path_factory.mktemp("datasets"))


def cfg(root, **fields):
    c = deeplabv3.get_config("ade20k").data
    c.root = str(root)
    c.update(fields)
    return c


def test_classes_and_palette():
    names, palette = data.ade20k.ADE20K_CLASSES, data.ade20k.ADE20K_PALETTE
    assert len(names) == len(set(names)) == len(palette) == 150
    assert (names[0], names[2], names[12], names[149]) == ("wall", "sky", "person", "flag")
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)


@pytest.mark.parametrize("level", ["parent", "ADEChallengeData2016"])
def test_values_shift_down_and_zero_is_ignored(root, level):
    folder = root if level == "parent" else root / "ADEChallengeData2016"
    ds = data.build(cfg(folder), "val")
    assert [Path(p).name for p, _ in ds.pairs] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    for i, (_, mask_path) in enumerate(ds.pairs):
        stored = np.array(Image.open(mask_path))
        _, mask = ds.read(i)
        expected = np.where(stored == 0, 255, stored.astype(np.int64) - 1)   # by hand
        assert torch.equal(mask, torch.from_numpy(expected.astype(np.uint8)))
    assert ds.info.class_names == data.ade20k.ADE20K_CLASSES


def test_bad_values_and_split_names_are_one_line_errors(tmp_path):
    root = write_ade20k(tmp_path)
    bad = root / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    stored = annotation(0, 36, 44)
    stored[3, 3] = 151
    Image.fromarray(stored).save(bad)
    with pytest.raises(data.DataError, match=rf"{bad}: mask values 151 are outside the ADE20K "
                                             r"values 0 \(other, ignored\) and 1-150"):
        data.build(cfg(root), "val").read(1)
    with pytest.raises(roots.MissingSplit, match=r"data.val_split='val' is not a split .*"
                                                 r"\['training', 'validation'\]"):
        data.build(cfg(root, val_split="val"), "val")


def gt_counts(root: Path) -> np.ndarray:
    """Per-class pixels of the validation annotations: value k is class k - 1, 0 is none."""
    counts = np.zeros(151, dtype=np.int64)
    for path in sorted((root / "ADEChallengeData2016/annotations/validation").glob("*.png")):
        counts += np.bincount(np.array(Image.open(path)).ravel(), minlength=151)
    return counts[1:]


def test_two_steps_of_the_preset_count_every_val_pixel(root, monkeypatch, tmp_path, one_thread):
    """Mixed image sizes, each fitted to eval.scale_to for the forward and scored at its own
    size: the val confusion matrix's ground truth is every annotated pixel, "other" none."""
    monkeypatch.setenv(roots.ENV, str(root))
    c = deeplabv3.get_config("ade20k")
    c.data.update(scale_to=(64, 32), crop_size=(32, 32), workers=0)
    c.eval.scale_to = (96, 48)
    c.train.update(steps=2, batch_size=2, eval_batch_size=2, log_every=1, eval_every=2,
                   checkpoint_every=2)
    summary = loop.train_and_evaluate(c, tmp_path / "run")
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    record = [r for r in map(json.loads, lines) if r["split"] == "val"][-1]
    np.testing.assert_array_equal(np.array(record["confusion_matrix"]).sum(1), gt_counts(root))
    assert summary["class_names"] == list(data.ade20k.ADE20K_CLASSES)
    assert set(summary["last_eval"]) == {"val"}
