"""Class balancing weights measured on a split.

Median frequency balancing (Eigen & Fergus, ICCV 2015; the weights SegNet trains CamVid with,
Badrinarayanan et al. 2017): freq(c) = pixels of class c / pixels of the images in which c
appears; weight(c) = median over classes of freq / freq(c). Rare classes get weights above 1,
dominant ones (road, sky) below. Ignored pixels count nowhere.
"""
from __future__ import annotations

import numpy as np

from seg.data.dataset import SegDataset


def class_frequencies(dataset: SegDataset) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of each class, labelled pixels of the images that contain the class), int64."""
    k, ignore = dataset.info.num_classes, dataset.info.ignore_index
    pixels, image_pixels = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for i in range(len(dataset)):
        counts = np.bincount(dataset.read(i)[1].numpy().ravel(), minlength=256)
        labelled = counts.sum() - counts[ignore]
        mine = counts[:k]
        pixels += mine
        image_pixels += np.where(mine > 0, labelled, 0)
    return pixels, image_pixels


def median_frequency_weights(dataset: SegDataset) -> tuple[float, ...]:
    """One weight per class; a class that never appears gets 0 (it has no pixel to weigh)."""
    pixels, image_pixels = class_frequencies(dataset)
    present = pixels > 0
    if not present.any():
        raise ValueError("loss.class_balance='median_frequency': the train split has no "
                         "labelled pixel")
    freq = np.where(present, pixels / np.maximum(image_pixels, 1), np.nan)
    return tuple(float(w) for w in np.where(present, np.nanmedian(freq) / freq, 0.0))
