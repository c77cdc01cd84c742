"""seg.visualize: exact colours, the grid layout, and un-normalisation back to the uint8 image."""
from __future__ import annotations

import pytest
import torch

from seg import visualize
from seg.data import batches

PALETTE = ((10, 20, 30), (40, 50, 60), (70, 80, 90))


def test_colorize_exact_colours_on_a_tiny_mask():
    mask = torch.tensor([[0, 1, 2], [255, 2, 7]])
    got = visualize.colorize(mask, visualize.palette_tensor(PALETTE, 3), ignore_index=255)
    ignore = visualize.IGNORE_COLOUR
    expected = torch.tensor([  # (H, W, 3) by hand; 7 is outside the palette: drawn as ignore
        [[10, 20, 30], [40, 50, 60], [70, 80, 90]],
        [list(ignore), [70, 80, 90], list(ignore)],
    ], dtype=torch.uint8).permute(2, 0, 1)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)


def test_colorize_keeps_batch_dimensions():
    masks = torch.tensor([[[0]], [[1]]])  # (B=2, 1, 1)
    got = visualize.colorize(masks, visualize.palette_tensor(PALETTE, 3))
    assert got.shape == (2, 3, 1, 1)
    assert got[1, :, 0, 0].tolist() == [40, 50, 60]


def test_default_palette_is_pascal_vocs():
    voc = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
           7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0), 15: (192, 128, 128),
           20: (0, 64, 128)}  # aeroplane ... person (15), tvmonitor (20), from the VOC devkit
    palette = visualize.default_palette(21)
    assert palette.shape == (21, 3) and palette.dtype == torch.uint8
    for c, rgb in voc.items():
        assert tuple(palette[c].tolist()) == rgb
    assert len({tuple(c) for c in palette.tolist()}) == 21
    assert torch.equal(visualize.palette_tensor((), 21), palette)


@pytest.mark.parametrize("palette", [((1, 2, 3),), ((1, 2),) * 3, ((0, 0, 256),) * 3])
def test_bad_palette_is_an_error(palette):
    with pytest.raises(ValueError, match="palette"):
        visualize.palette_tensor(palette, 3)


@pytest.mark.parametrize("mean, std", [((0.3, 0.5, 0.7), (0.2, 0.25, 0.3)),
                                       ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_unnormalize_inverts_the_pipelines_normalize(mean, std):
    images = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    images[0, :, 0, 0], images[0, :, 0, 1] = 0, 255  # both ends of the range
    assert torch.equal(visualize.unnormalize(batches.normalize(images, mean, std), mean, std),
                       images)


def solid(h, w, value):
    return torch.full((3, h, w), value, dtype=torch.uint8)


def test_grid_layout_by_hand():
    # row 0: a 2x3 and a 2x2 picture; row 1: one 3x1 picture. pad 1, fill 9.
    rows = [[solid(2, 3, 1), solid(2, 2, 2)], [solid(3, 1, 3)]]
    got = visualize.grid(rows, pad=1, fill=9)[0]
    expected = torch.tensor([
        [9, 9, 9, 9, 9, 9, 9, 9],
        [9, 1, 1, 1, 9, 2, 2, 9],
        [9, 1, 1, 1, 9, 2, 2, 9],
        [9, 9, 9, 9, 9, 9, 9, 9],
        [9, 3, 9, 9, 9, 9, 9, 9],
        [9, 3, 9, 9, 9, 9, 9, 9],
        [9, 3, 9, 9, 9, 9, 9, 9],
        [9, 9, 9, 9, 9, 9, 9, 9],
    ], dtype=torch.uint8)
    assert torch.equal(got, expected)


def test_prediction_grid_rows_are_image_truth_prediction():
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    masks = torch.tensor([0, 255]).view(2, 1, 1).expand(2, 4, 5)
    preds = torch.tensor([1, 2]).view(2, 1, 1).expand(2, 4, 5)
    palette = visualize.palette_tensor(PALETTE, 3)
    got = visualize.prediction_grid(images, masks, preds, palette)
    pad = 2
    assert got.shape == (3, 2 * 4 + 3 * pad, 3 * 5 + 4 * pad)

    def cell(row, col):
        y, x = pad + row * (4 + pad), pad + col * (5 + pad)
        return got[:, y:y + 4, x:x + 5]

    assert torch.equal(cell(1, 0), images[1])
    assert cell(0, 1)[:, 0, 0].tolist() == [10, 20, 30]          # truth: class 0
    assert cell(1, 1)[:, 0, 0].tolist() == list(visualize.IGNORE_COLOUR)
    assert cell(0, 2)[:, 3, 4].tolist() == [40, 50, 60]          # prediction: class 1
    assert cell(1, 2)[:, 3, 4].tolist() == [70, 80, 90]


# ---------------------------------------------------------------- pictures a person can read

def test_upscale_is_nearest_by_a_whole_factor():
    picture = torch.tensor([[[1, 2], [3, 4]]], dtype=torch.uint8)
    assert visualize.upscale(picture, 2)[0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2],
                                                       [3, 3, 4, 4], [3, 3, 4, 4]]
    assert visualize.upscale_factor(64, 64) == 4 and visualize.upscale_factor(65, 10) == 4
    assert visualize.upscale_factor(200, 266) == 1 and visualize.upscale_factor(300, 40) == 1


def test_labelled_grid_places_titles_panels_and_legend():
    rows = [[solid(10, 20, 1), solid(10, 20, 2)], [solid(10, 20, 3), solid(10, 20, 4)]]
    legend = [("cat", (200, 0, 0)), ("dog", (0, 0, 200))]
    picture = visualize.labelled_grid(rows, ("left", "right"), legend)
    factor = 13   # ceil(256 / 20)
    (y0, x0, h, w), (y1, x1, _, _) = picture.cells[0][0], picture.cells[1][1]
    assert (h, w) == (10 * factor, 20 * factor)
    assert x0 == 2 and x1 == 2 + w + 2 and y1 == y0 + h + 2 and y0 > 10   # titles above
    pixels = picture.pixels
    assert (pixels[:, y0:y0 + h, x0:x0 + w] == 1).all()
    assert (pixels[:, y1:y1 + h, x1:x1 + w] == 4).all()
    assert (pixels[:, :y0 - 2] < 128).any()   # title text
    below = pixels[:, y1 + h:]
    for colour in ((200, 0, 0), (0, 0, 200)):   # a swatch per legend entry
        assert (below == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all(0).sum() > 50


def test_legend_lists_the_classes_shown_and_ignore():
    palette = visualize.palette_tensor(PALETTE, 3)
    entries = visualize.legend_entries([torch.tensor([[2, 255]]), torch.tensor([[0, 2]])],
                                       ("a", "b", "c"), palette)
    assert entries == [("a", (10, 20, 30)), ("c", (70, 80, 90)),
                       ("ignore", visualize.IGNORE_COLOUR)]


def test_overlay_blends_the_prediction_colours_over_the_image():
    image = solid(4, 4, 100)
    pred = torch.tensor([[0, 1, 2, 0]] * 4)
    picture = visualize.overlay_picture(image, pred, visualize.palette_tensor(PALETTE, 3),
                                        ("a", "b", "c"))
    (y, x, h, w), (_, x2, _, _) = picture.cells[0]
    assert (h, w) == (256, 256)   # 4x4 enlarged 64x
    assert (picture.pixels[:, y:y + h, x:x + w] == 100).all()
    blended = picture.pixels[:, y, x2 + 64]    # pixel (0, 1): class 1 (40, 50, 60) at 0.5
    assert blended.tolist() == [70, 75, 80]
