"""Dataset readers on tiny fixtures written in the official layouts, the bad-data errors, and the
shared real datasets (skipped when absent)."""
from __future__ import annotations

import sys
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from configs import common, presets
from conftest import SHARED_DATASETS
from seg import data
from seg.data.voc import voc_palette

H, W = 8, 12


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, palette=None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is None:
        im = Image.fromarray(array)
    else:   # the array holds the palette indices
        im = Image.frombytes("P", array.shape[::-1], array.tobytes())
        colours = list(palette) + [(0, 0, 0)] * (256 - len(palette))   # a short palette
        im.putpalette([v for c in colours for v in c])                 # gets remapped on save
    im.save(path, **kwargs)
    return path


def pil_rgb(path: Path) -> torch.Tensor:
    """Independent reference decode: PIL, expanded to RGB, as (3, H, W)."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def cfg(**fields):
    c = common.get_base_config().data
    c.update(fields)
    return c


# ------------------------------------------------------------------ generic folder layout

def labels(seed: int, n: int, ignore: bool = True) -> np.ndarray:
    m = np.random.default_rng(seed).integers(0, n, (H, W), dtype=np.uint8)
    if ignore:
        m[0, :3] = 255
    return m


@pytest.fixture
def folder(tmp_path):
    """train: a (RGB png), b (grayscale png), c (RGB jpg); val: d. Three classes."""
    root = tmp_path / "ds"
    save(root / "train/images/a.png", rgb(1))
    save(root / "train/images/b.png", rgb(2)[..., 0])
    save(root / "train/images/c.jpg", rgb(3), quality=90)
    save(root / "val/images/d.png", rgb(4))
    for i, (split, stem) in enumerate([("train", "a"), ("train", "b"), ("train", "c"),
                                       ("val", "d")]):
        save(root / f"{split}/masks/{stem}.png", labels(i, 3))
    meta = dict(name="tiny", classes=["bg", "x", "y"], ignore_index=255,
                palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]],
                stats=dict(train_rgb_mean=[0.1, 0.2, 0.3], train_rgb_std=[0.4, 0.5, 0.6]))
    (root / "classes.json").write_text(json.dumps(meta))
    return root


def test_folder_reads_exact_pixels_and_pairs_by_stem(folder):
    ds = data.build(cfg(name="folder", root=str(folder)), "train")
    assert len(ds) == 3
    assert ds.source(2) == f"{folder}/train/images/c.jpg + {folder}/train/masks/c.png"
    image, mask = ds.read(0)
    assert image.dtype == mask.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy(rgb(1)).permute(2, 0, 1))
    assert torch.equal(mask, torch.from_numpy(labels(0, 3)))
    assert torch.equal(ds.read(2)[0], pil_rgb(folder / "train/images/c.jpg"))
    assert torch.equal(ds[2][1], torch.from_numpy(labels(2, 3)))


def test_grayscale_image_becomes_three_equal_channels(folder):
    image, _ = data.build(cfg(name="folder", root=str(folder)), "train").read(1)
    gray = torch.from_numpy(rgb(2)[..., 0])
    assert image.shape == (3, H, W)
    assert all(torch.equal(image[c], gray) for c in range(3))


def test_folder_info_comes_from_classes_json(folder):
    info = data.build(cfg(name="folder", root=str(folder)), "val").info
    assert (info.name, info.class_names, info.num_classes) == ("tiny", ("bg", "x", "y"), 3)
    assert (info.mean, info.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert info.palette == ((0, 0, 0), (255, 0, 0), (0, 255, 0))
    imagenet = data.build(cfg(name="folder", root=str(folder), normalize="imagenet"), "val").info
    assert (imagenet.mean, imagenet.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_split_names_map_through_the_config(folder):
    ds = data.build(cfg(name="folder", root=str(folder), val_split="train"), "val")
    assert len(ds) == 3


def test_palette_mask_in_a_folder_is_read_as_indices(folder):
    m = labels(7, 3)
    save(folder / "train/masks/a.png", m, palette=[(9, 9, 9), (200, 0, 0), (0, 0, 200)])
    assert Image.open(folder / "train/masks/a.png").mode == "P"
    assert torch.equal(data.build(cfg(name="folder", root=str(folder)), "train").read(0)[1],
                       torch.from_numpy(m))


def test_folder_reduce_zero_label_ignores_zero_and_shifts_the_rest(folder):
    stored = np.array([[0, 1, 2, 3, 255, 0]] * H, dtype=np.uint8)[:, :W // 2].repeat(2, 1)
    save(folder / "train/masks/a.png", stored)
    mask = data.build(cfg(name="folder", root=str(folder), reduce_zero_label=True),
                      "train").read(0)[1]
    expected = {0: 255, 1: 0, 2: 1, 3: 2, 255: 255}   # by hand: k -> k - 1, 0 and 255 ignored
    assert mask.tolist() == [[expected[v] for v in row] for row in stored.tolist()]


def test_folder_label_map_maps_listed_values_and_refuses_others(folder):
    stored = np.array([[7, 8, 11, 0, 255, 7]] * H, dtype=np.uint8)[:, :W // 2].repeat(2, 1)
    save(folder / "train/masks/a.png", stored)
    table = {7: 0, 8: 1, 11: 2, 0: 255}
    c = cfg(name="folder", root=str(folder), label_map=tuple(table.items()))
    mask = data.build(c, "train").read(0)[1]
    assert mask.tolist() == [[table.get(v, 255) for v in row] for row in stored.tolist()]
    stored[2, 3] = 9
    save(folder / "train/masks/a.png", stored)
    with pytest.raises(data.DataError, match=r"a.png: mask values 9 are outside the values of "
                                             r"data.label_map \(0, 7, 8, 11\)"):
        data.build(c, "train").read(0)


@pytest.mark.parametrize("fields, match", [
    (dict(label_map=((7, 3),)), r"data.label_map: value 7 -> 3, which is neither a class in "
                                r"\[0, 3\)"),
    (dict(label_map=((7, 0), (7, 1))), r"data.label_map: stored value 7 .* listed twice"),
    (dict(label_map=((7,),)), r"data.label_map: \(7,\) is not a \(stored value, class\) pair"),
    (dict(label_map=((1, 0),), reduce_zero_label=True), r"data.reduce_zero_label=True and "
                                                        r"data.label_map are both set"),
])
def test_bad_label_map_names_the_field(folder, fields, match):
    with pytest.raises(ValueError, match=match):
        data.build(cfg(name="folder", root=str(folder), **fields), "train")


def test_label_map_fields_belong_to_the_folder_reader(tmp_path):
    with pytest.raises(ValueError, match=r"data.reduce_zero_label / data.label_map apply to "
                                         r"data.name='folder'; the voc reader"):
        data.build(cfg(name="voc", root=str(tmp_path), reduce_zero_label=True), "train")


# ------------------------------------------------------------------ bad data

def test_unset_or_missing_root_names_data_root(tmp_path):
    with pytest.raises(data.DataError, match=r"data.root is not set.*--config.data.root"):
        data.build(cfg(name="voc"), "train")
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match=rf"data.root='{missing}': no such folder"):
        data.build(cfg(name="folder", root=str(missing)), "train")


def test_missing_split_names_the_path_and_the_split_field(folder):
    with pytest.raises(data.DataError, match=rf"{folder}/dev/images not found: "
                                             r"data.test_split='dev'.*\['train', 'val'\]"):
        data.build(cfg(name="folder", root=str(folder), test_split="dev"), "test")
    with pytest.raises(data.DataError, match="data.test_split is empty"):
        data.build(cfg(name="folder", root=str(folder), test_split=""), "test")


def test_image_without_mask_is_named(folder):
    save(folder / "train/images/e.png", rgb(5))
    with pytest.raises(data.DataError, match=rf"{folder}/train/images/e.png has no mask "
                                             rf"{folder}/train/masks/e.png"):
        data.build(cfg(name="folder", root=str(folder)), "train")


def test_mask_of_another_size_names_both_files(folder):
    save(folder / "train/masks/b.png", np.zeros((H, W + 1), np.uint8))
    ds = data.build(cfg(name="folder", root=str(folder)), "train")
    with pytest.raises(data.DataError, match=rf"{folder}/train/masks/b.png is \(8, 13\).*"
                                             rf"{folder}/train/images/b.png is \(8, 12\)"):
        ds.read(1)


def test_out_of_range_mask_values_are_named_on_read_and_by_verify(folder):
    m = labels(1, 3)
    m[3, 3], m[4, 4] = 7, 254
    save(folder / "train/masks/b.png", m)
    ds = data.build(cfg(name="folder", root=str(folder)), "train")
    ds.read(0)
    with pytest.raises(data.DataError, match=rf"{folder}/train/masks/b.png: mask values 7, 254 "
                                             r"are outside \[0, 3\).*data.num_classes=3"):
        ds.read(1)
    with pytest.raises(data.DataError, match="masks/b.png: mask values 7, 254"):
        data.build(cfg(name="folder", root=str(folder), verify=True), "train")


@pytest.mark.parametrize("name, cut", [("a.png", 0.5), ("c.jpg", 0.5), ("a.png", 0.02)])
def test_truncated_or_corrupt_image_is_named(folder, name, cut):
    path = folder / "train/images" / name
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * cut)])
    ds = data.build(cfg(name="folder", root=str(folder)), "train")
    index = "abc".index(name[0])
    with pytest.raises(data.DataError, match=rf"{path}: (corrupt or truncated|not a readable)"):
        ds.read(index)


def test_garbage_mask_file_is_named(folder):
    (folder / "train/masks/a.png").write_bytes(b"not a png at all")
    with pytest.raises(data.DataError, match=r"masks/a.png: not a readable image"):
        data.build(cfg(name="folder", root=str(folder)), "train").read(0)


def test_truncated_loading_in_pil_is_refused(folder, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(data.DataError, match="LOAD_TRUNCATED_IMAGES is on"):
        data.build(cfg(name="folder", root=str(folder)), "train").read(0)


def test_rgb_colour_mask_is_refused_with_the_palette_hint(folder):
    save(folder / "train/masks/a.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(data.DataError, match=r"masks/a.png: mask is an RGB colour image; expected "
                                             r"class indices.*palette"):
        data.build(cfg(name="folder", root=str(folder)), "train").read(0)


def test_num_classes_or_ignore_index_unlike_classes_json_names_the_field(folder):
    with pytest.raises(data.DataError, match=r"data.num_classes=4 but .*classes.json has 3 "
                                             r"classes"):
        data.build(cfg(name="folder", root=str(folder), num_classes=4), "train")
    with pytest.raises(data.DataError, match=r"data.ignore_index=0 but .*ignore_index 255"):
        data.build(cfg(name="folder", root=str(folder), ignore_index=0), "train")


def test_normalisation_needs_stats_or_imagenet(folder):
    (folder / "classes.json").unlink()
    with pytest.raises(data.DataError, match="data.normalize='dataset'.*data.normalize='imagenet'"):
        data.build(cfg(name="folder", root=str(folder)), "train")
    info = data.build(cfg(name="folder", root=str(folder), normalize="imagenet"), "train").info
    assert info.class_names == ("class_0", "class_1", "class_2") and info.name == "ds"
    with pytest.raises(data.DataError, match="data.normalize='zscore'"):
        data.build(cfg(name="folder", root=str(folder), normalize="zscore"), "train")


def test_unknown_dataset_or_split_is_refused(folder):
    with pytest.raises(ValueError, match="data.name='cityscapes'"):
        data.build(cfg(name="cityscapes"), "train")
    with pytest.raises(ValueError, match="split='dev'"):
        data.build(cfg(name="folder", root=str(folder)), "dev")


# ------------------------------------------------------------------ CamVid, SegNet layout

@pytest.mark.parametrize("nested", [True, False])
def test_camvid_segnet_layout_maps_void_11_to_ignore(tmp_path, nested):
    base = tmp_path / "CamVid" if nested else tmp_path
    annot = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 12
    save(base / "train/0001TP_1.png", rgb(1))
    save(base / "trainannot/0001TP_1.png", annot)
    save(base / "val/0016E5_1.png", rgb(2))
    save(base / "valannot/0016E5_1.png", annot)
    c = cfg(name="camvid", root=str(tmp_path), num_classes=11)
    ds = data.build(c, "train")
    image, mask = ds.read(0)
    assert torch.equal(image, torch.from_numpy(rgb(1)).permute(2, 0, 1))
    expected = torch.from_numpy(annot).clone()
    expected[expected == 11] = 255
    assert torch.equal(mask, expected)
    assert ds.info.class_names[10] == "Bicyclist" and len(data.build(c, "val")) == 1
    save(base / "valannot/0016E5_1.png", np.full((H, W), 12, np.uint8))
    with pytest.raises(data.DataError, match=r"0016E5_1.png: mask values 12 are outside 0-10"):
        data.build(c, "val").read(0)
    with pytest.raises(data.DataError, match=r"no CamVid split data.test_split='test'"):
        data.build(c, "test")
    with pytest.raises(data.DataError, match="data.num_classes=12 but CamVid"):
        data.build(cfg(name="camvid", root=str(tmp_path), num_classes=12), "train")


# ------------------------------------------------------------------ PASCAL VOC

def _voc(root: Path, train=("2007_000032", "2007_000039"), val=("2007_000033",)) -> Path:
    voc = root / "VOCdevkit/VOC2012"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    for split, ids in (("train", train), ("val", val)):
        (voc / f"ImageSets/Segmentation/{split}.txt").write_text("".join(i + "\n" for i in ids))
    for k, i in enumerate(train + val):
        save(voc / f"JPEGImages/{i}.jpg", rgb(10 + k), quality=90)
        save(voc / f"SegmentationClass/{i}.png", voc_mask(k), palette=voc_palette())
    return voc


def voc_mask(k: int) -> np.ndarray:
    m = np.full((H, W), k % 21, np.uint8)
    m[2:5, 3:9], m[:, 0] = 15, 255      # a person with its border
    return m


def test_voc_palette_is_the_devkit_colour_map():
    p = voc_palette()
    assert p[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
    assert p[15] == (192, 128, 128) and p[20] == (0, 64, 128) and p[255] == (224, 224, 192)


@pytest.mark.parametrize("root_level", ["parent", "VOC2012"])
def test_voc_reads_palette_indices_and_split_lists(tmp_path, root_level):
    voc = _voc(tmp_path)
    assert Image.open(voc / "SegmentationClass/2007_000032.png").mode == "P"
    c = cfg(name="voc", num_classes=21, root=str(tmp_path if root_level == "parent" else voc))
    train, val = data.build(c, "train"), data.build(c, "val")
    assert [Path(p[0]).stem for p in train.pairs] == ["2007_000032", "2007_000039"]
    image, mask = val.read(0)
    assert torch.equal(mask, torch.from_numpy(voc_mask(2)))
    assert torch.equal(image, pil_rgb(voc / "JPEGImages/2007_000033.jpg"))
    assert val.info.class_names[15] == "person" and val.info.palette[15] == (192, 128, 128)
    assert val.info.mean == (0.485, 0.456, 0.406)


def test_voc_missing_split_file_lists_the_available_ones(tmp_path):
    _voc(tmp_path)
    with pytest.raises(data.DataError, match=r"test.txt not found: set data.test_split to one of "
                                             r"\['train', 'val'\]"):
        data.build(cfg(name="voc", num_classes=21, root=str(tmp_path)), "test")
    with pytest.raises(data.DataError, match=r"no folder holding VOCdevkit/VOC2012 found "
                                             r"\(searched .*ImageSets/Segmentation"):
        data.build(cfg(name="voc", num_classes=21,
                       root=str(tmp_path / "VOCdevkit/VOC2012/JPEGImages")), "val")


def test_voc_aug_train_set_is_sbd_plus_voc_train_minus_voc_val(tmp_path):
    voc = _voc(tmp_path)
    aug = tmp_path / "SegmentationClassAug"
    sbd_only = np.full((H, W), 7, np.uint8)
    save(aug / "2008_000001.png", sbd_only)                  # SBD only: its mask is used
    save(aug / "2007_000033.png", np.zeros((H, W), np.uint8))  # a VOC val image: left out
    save(aug / "2007_000032.png", np.zeros((H, W), np.uint8))  # VOC train: VOC's mask wins
    save(voc / "JPEGImages/2008_000001.jpg", rgb(20), quality=90)
    ds = data.build(cfg(name="voc", num_classes=21, root=str(tmp_path), sbd_root=str(aug)),
                    "train")
    assert [Path(p[0]).stem for p in ds.pairs] == ["2007_000032", "2007_000039", "2008_000001"]
    assert torch.equal(ds.read(0)[1], torch.from_numpy(voc_mask(0)))
    assert torch.equal(ds.read(2)[1], torch.from_numpy(sbd_only))
    val = data.build(cfg(name="voc", num_classes=21, root=str(tmp_path), sbd_root=str(aug)), "val")
    assert len(val) == 1   # sbd_root changes only the train split


def _sbd(tmp_path: Path, ids=("2008_000001",)) -> Path:
    sbd = tmp_path / "benchmark_RELEASE/dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("".join(i + "\n" for i in ids))
    (sbd / "val.txt").write_text("")
    return sbd


def test_sbd_mat_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)   # import now fails as if not installed
    voc, sbd = _voc(tmp_path), _sbd(tmp_path)
    (sbd / "cls/2008_000001.mat").write_bytes(b"")
    save(voc / "JPEGImages/2008_000001.jpg", rgb(20), quality=90)
    ds = data.build(cfg(name="voc", num_classes=21, root=str(tmp_path),
                        sbd_root=str(sbd.parent)), "train")
    assert ds.pairs[-1][1] == str(sbd / "cls/2008_000001.mat")
    with pytest.raises(data.DataError, match=r"2008_000001.mat: reading SBD .mat masks needs "
                                             r"scipy \(pip install scipy\)"):
        ds.read(2)


def test_sbd_mat_class_map_is_read(tmp_path):
    from scipy.io import savemat
    voc, sbd = _voc(tmp_path), _sbd(tmp_path)
    seg = np.full((H, W), 12, np.uint8)
    savemat(sbd / "cls/2008_000001.mat", {"GTcls": {"Segmentation": seg, "Boundaries": 0}})
    save(voc / "JPEGImages/2008_000001.jpg", rgb(20), quality=90)
    ds = data.build(cfg(name="voc", num_classes=21, root=str(tmp_path), sbd_root=str(sbd)), "train")
    assert torch.equal(ds.read(2)[1], torch.from_numpy(seg))


def test_voc_rgb_mask_is_refused(tmp_path):
    voc = _voc(tmp_path)
    save(voc / "SegmentationClass/2007_000033.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(data.DataError, match="2007_000033.png: mask is an RGB colour image"):
        data.build(cfg(name="voc", num_classes=21, root=str(tmp_path)), "val").read(0)


# ------------------------------------------------------------------ Oxford-IIIT Pet

PETS = [("Abyssinian_1", 1), ("Abyssinian_2", 1), ("american_bulldog_1", 2),
        ("american_bulldog_2", 2), ("Bengal_1", 1), ("beagle_1", 2), ("beagle_2", 2)]


def trimap(k: int) -> np.ndarray:
    t = np.full((H, W), 2, np.uint8)          # background
    t[2:6, 3:9] = 1                            # pet
    t[2, 3:9] = t[5, 3:9] = 3                  # border
    t[0, k] = 1
    return t


@pytest.fixture
def pets_root(tmp_path):
    ann = tmp_path / "annotations"
    lines = ["#Image CLASS-ID SPECIES BREED ID"]
    for k, (name, species) in enumerate(PETS):
        save(tmp_path / f"images/{name}.jpg", rgb(30 + k), quality=90)
        save(ann / f"trimaps/{name}.png", trimap(k))
        lines.append(f"{name} {k + 1} {species} {k + 1}")
    (ann / "trainval.txt").write_text("\n".join(lines[:6]) + "\n")   # the first five pets
    (ann / "test.txt").write_text("\n".join(lines[6:]) + "\n")
    return tmp_path


def test_pets_trimaps_map_to_background_species_and_ignore(pets_root):
    c = cfg(name="pets", root=str(pets_root), num_classes=3)
    trainval = data.build(cfg(name="pets", root=str(pets_root), num_classes=3,
                              train_split="trainval"), "train")
    assert len(trainval) == 5
    for k in (0, 2):   # a cat, a dog
        image, mask = trainval.read(k)
        expected = np.select([trimap(k) == 1, trimap(k) == 2], [PETS[k][1], 0], 255)
        assert torch.equal(mask, torch.from_numpy(expected.astype(np.uint8)))
        assert torch.equal(image, pil_rgb(pets_root / f"images/{PETS[k][0]}.jpg"))
    assert trainval.info.class_names == ("background", "cat", "dog")
    test = data.build(c, "test")
    assert [Path(p[0]).stem for p in test.pairs] == ["beagle_1", "beagle_2"]
    assert test.read(1)[1][0, 6] == 2


def test_pets_val_is_every_fifth_trainval_line(pets_root):
    c = cfg(name="pets", root=str(pets_root), num_classes=3)
    stems = lambda ds: [Path(p[0]).stem for p in ds.pairs]
    assert stems(data.build(c, "val")) == ["Bengal_1"]
    assert stems(data.build(c, "train")) == [n for n, _ in PETS[:4]]


def test_pets_bad_trimap_value_and_bad_list_line(pets_root):
    t = trimap(0)
    t[1, 1] = 0
    save(pets_root / "annotations/trimaps/Abyssinian_1.png", t)
    c = cfg(name="pets", root=str(pets_root), num_classes=3)
    with pytest.raises(data.DataError, match=r"Abyssinian_1.png: mask values 0 are outside the "
                                             r"trimap values"):
        data.build(c, "train").read(0)
    (pets_root / "annotations/test.txt").write_text("beagle_1 1 3 1\n")
    with pytest.raises(data.DataError, match=r"test.txt: line 'beagle_1 1 3 1'"):
        data.build(c, "test")
    with pytest.raises(data.DataError, match=r"data.val_split='minival' is not an Oxford"):
        data.build(cfg(name="pets", root=str(pets_root), num_classes=3, val_split="minival"),
                   "val")


# ------------------------------------------------------------------ the shared datasets

def _staged(name: str) -> bool:
    """The staged copy (it has a classes.json), not a user's own full dataset of that name."""
    return (SHARED_DATASETS / name / "classes.json").is_file()


@pytest.mark.skipif(not _staged("camvid"), reason="shared datasets absent")
@pytest.mark.parametrize("preset, sizes, classes", [
    ("camvid", {"train": 367, "val": 101}, ("Sky", "Building", "Pole", "Road", "Pavement",
                                            "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                                            "Bicyclist")),
    ("membrane", {"train": 20, "val": 5, "test": 5}, ("membrane", "cell")),
    ("bagdata", {"train": 373, "val": 80, "test": 80}, ("background", "bag")),
])
def test_shared_datasets_through_their_presets(preset, sizes, classes):
    """The presets say no path: the data is found through $SEG_DATASETS/<data.dirname>."""
    c = presets.apply(common.get_base_config(), preset).data
    assert c.root is None and c.dirname == preset
    meta = json.loads((SHARED_DATASETS / preset / "classes.json").read_text())
    for split, n in sizes.items():
        ds = data.build(c, split)
        assert len(ds) == n and ds.info.class_names == classes == tuple(meta["classes"])
        assert ds.pairs[0][0].startswith(str(SHARED_DATASETS / preset))
        assert ds.info.mean == tuple(meta["stats"]["train_rgb_mean"])
        for i in (0, n - 1):   # a couple of samples: decoding all of CamVid is too slow
            image, mask = ds.read(i)
            assert image.shape[0] == 3 and image.shape[1:] == mask.shape
            assert tuple(image.shape[1:]) == tuple(meta["image_size_hw"])
            values = set(mask.unique().tolist())
            assert values <= set(range(len(classes))) | {255} and len(values) >= 2


@pytest.mark.skipif(not _staged("camvid"), reason="shared datasets absent")
def test_camvid_preset_evaluates_the_test_split_only_when_the_folder_has_one(tmp_path):
    """The shared copy withholds SegNet's test split: it is skipped with a warning naming the
    field; a folder that has one gets it evaluated."""
    c = presets.apply(common.get_base_config(), "camvid").data
    c.storage = "raw"
    with pytest.warns(UserWarning, match=r"no test split.*data.test_optional.*"
                                         r"data.test_split='test'"):
        splits = data.build_splits(c)
    assert set(splits) == {"train", "val"}
    c.test_optional = False
    with pytest.raises(data.DataError, match=r"data.test_split='test'"):
        data.build_splits(c)
    # a SegNet-layout CamVid with its test split: the same preset evaluates it
    root = tmp_path / "CamVid"
    for split in ("train", "val", "test"):
        save(root / f"{split}/x.png", rgb(1))
        save(root / f"{split}annot/x.png", labels(2, 12, ignore=False))
    c.root, c.test_optional = str(tmp_path), True
    assert set(data.build_splits(c)) == {"train", "val", "test"}
