"""Cityscapes: a miniature copy in the official layout and file names, read by seg's reader and
checked against torchvision's Cityscapes (its file pairing and its copy of the official label
table), then trained for two steps with the `cityscapes` preset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import Cityscapes

from configs import pspnet
from seg import data, loop
from seg.data import roots

H, W = 32, 64      # Cityscapes' 1:2 aspect, 32x smaller
# Label ids drawn in the miniature: ones that map to a train id and ones that are ignored
# (0-6 void, 9 parking, 14 guard rail, 18 polegroup, 29 caravan), and 255, the -1 of
# license plate read back from a uint8 image.
IDS = np.array([0, 1, 4, 6, 7, 8, 9, 11, 14, 17, 18, 21, 23, 24, 26, 29, 31, 33])
SPLITS = {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2, "lindau": 1}}


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def label_ids(seed: int) -> np.ndarray:
    """Blocks of label ids (a network can see blocks), a few pixels of 255."""
    g = np.random.default_rng(seed)
    blocks = g.choice(IDS, size=(H // 8, W // 8))
    ids = blocks.repeat(8, 0).repeat(8, 1).astype(np.uint8)
    ids[g.integers(0, H, 5), g.integers(0, W, 5)] = 255
    return ids


def write_cityscapes(root: Path) -> Path:
    """leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png with gtFine's labelIds,
    color and polygons files; bochum's image has only a labelTrainIds file (as written by
    cityscapesScripts' createTrainIdLabelImgs.py)."""
    train_id = {c.id: c.train_id for c in Cityscapes.classes}
    seed = 0
    for split, cities in SPLITS.items():
        for city, n in cities.items():
            for frame in range(n):
                stem = f"{city}_000000_{19 + frame:06d}"
                ids = label_ids(seed)
                image = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
                seed += 1
                _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
                gt = root / "gtFine" / split / city
                _save(gt / f"{stem}_gtFine_color.png", image)
                (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
                if city == "bochum":
                    trains = np.vectorize(lambda i: train_id.get(int(i), 255) % 256)(ids)
                    _save(gt / f"{stem}_gtFine_labelTrainIds.png", trains.astype(np.uint8))
                else:
                    _save(gt / f"{stem}_gtFine_labelIds.png", ids)
    return root


def reference_train_ids(ids: np.ndarray) -> np.ndarray:
    """torchvision's copy of cityscapesScripts' table: id -> train id, 255 / -1 -> ignored."""
    lut = np.full(256, 255, dtype=np.uint8)
    for c in Cityscapes.classes:
        if c.id >= 0 and c.train_id not in (255, -1):
            lut[c.id] = c.train_id
    return lut[ids]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("datasets") / "cityscapes")


def cfg(root, **fields):
    c = pspnet.get_config("cityscapes").data
    c.root = str(root)
    c.update(fields)
    return c


def test_classes_and_colours_are_the_official_train_ids():
    official = sorted((c for c in Cityscapes.classes if c.train_id not in (255, -1)),
                      key=lambda c: c.train_id)
    assert [c.train_id for c in official] == list(range(19))
    assert data.cityscapes.CITYSCAPES_CLASSES == tuple(c.name for c in official)
    assert data.cityscapes.CITYSCAPES_PALETTE == tuple(c.color for c in official)
    lut = data.cityscapes.train_id_table(255)
    assert torch.equal(lut, torch.from_numpy(reference_train_ids(np.arange(256))))


def test_pairs_are_torchvisions_and_masks_its_table(root):
    ds = data.build(cfg(root), "val")
    reference = Cityscapes(str(root), split="val", mode="fine", target_type="semantic")
    # torchvision keeps one file per target type: [labelIds]
    assert ds.pairs == sorted((image, target) for image, (target,) in
                              zip(reference.images, reference.targets))
    assert ds.info.class_names == data.cityscapes.CITYSCAPES_CLASSES
    for i, (image_path, label_path) in enumerate(ds.pairs):
        image, mask = ds.read(i)
        assert torch.equal(mask, torch.from_numpy(reference_train_ids(
            np.array(Image.open(label_path)))))
        assert torch.equal(image.permute(1, 2, 0),
                           torch.from_numpy(np.array(Image.open(image_path))))


def test_label_train_ids_files_are_read_when_the_label_ids_are_missing(root):
    ds = data.build(cfg(root), "train")
    assert [Path(p).name for _, p in ds.pairs] == [
        "aachen_000000_000019_gtFine_labelIds.png", "aachen_000000_000020_gtFine_labelIds.png",
        "bochum_000000_000019_gtFine_labelTrainIds.png"]
    _, mask = ds.read(2)
    assert torch.equal(mask, torch.from_numpy(reference_train_ids(label_ids(2))))


def test_bad_label_files_and_splits_are_one_line_errors(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    bad = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    ids = label_ids(0)
    ids[0, 0] = 40
    _save(bad, ids)
    with pytest.raises(data.DataError, match=rf"{bad}: mask values 40 are outside the "
                                             r"Cityscapes label ids 0-33"):
        data.build(cfg(root), "val").read(2)
    bad.unlink()
    with pytest.raises(data.DataError, match=r"lindau_000000_000019_leftImg8bit.png has no "
                                             r"label file .*_gtFine_labelIds.png"):
        data.build(cfg(root), "val")
    with pytest.raises(roots.MissingSplit, match=r"data.test_split='test' is not a split .*"
                                                 r"\['train', 'val'\]"):
        data.build(cfg(root, test_split="test"), "test")


def gt_counts(root: Path) -> np.ndarray:
    """Per-class pixels of the val split, counted from the label files through the table."""
    counts = np.zeros(19, dtype=np.int64)
    for (target,) in Cityscapes(str(root), split="val", mode="fine",
                                target_type="semantic").targets:
        train_ids = reference_train_ids(np.array(Image.open(target)))
        counts += np.bincount(train_ids[train_ids != 255], minlength=19)
    return counts


def test_two_steps_of_the_preset_count_every_val_pixel_of_the_table(root, monkeypatch,
                                                                    tmp_path, one_thread):
    """The preset as a user runs it, data found through $SEG_DATASETS, sizes cut to the CPU;
    the val confusion matrix holds exactly the labelled pixels: ignored ids and the padding
    of small crops never count."""
    monkeypatch.setenv(roots.ENV, str(root.parent))
    c = pspnet.get_config("cityscapes")
    c.data.update(scale_to=(128, 64), crop_size=(48, 48), workers=0)   # crops larger than
    c.eval.scale_to = (128, 64)                                        # some scaled images
    c.train.update(steps=2, batch_size=2, eval_batch_size=2, log_every=1, eval_every=2,
                   checkpoint_every=2)
    summary = loop.train_and_evaluate(c, tmp_path / "run")
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    record = [r for r in map(json.loads, lines) if r["split"] == "val"][-1]
    confusion = np.array(record["confusion_matrix"])
    expected = gt_counts(root)
    assert expected.sum() > 0 and (expected == 0).any()   # some classes absent, as in real val
    np.testing.assert_array_equal(confusion.sum(1), expected)
    assert summary["class_names"] == list(data.cityscapes.CITYSCAPES_CLASSES)
    assert set(summary["iou_by_class"]["val"]) == set(data.cityscapes.CITYSCAPES_CLASSES)
    assert set(summary["last_eval"]) == {"val"}   # the preset has no test split
