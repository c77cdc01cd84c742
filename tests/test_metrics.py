from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seg import metrics

IGN = 255

# A per-image metrics notebook's own check (its MetricsCollection example), copied verbatim.
NB_PRED = torch.tensor([[[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
                        [[0, 0, 0, 0], [0, 2, 2, 0], [0, 2, 0, 0], [0, 0, 0, 0]]])
NB_TARGET = torch.tensor([[[0, 0, 0, 0], [0, 1, 255, 0], [0, 1, 255, 0], [0, 0, 0, 0]],
                          [[0, 0, 0, 0], [0, 255, 2, 0], [0, 255, 2, 0], [0, 0, 0, 0]]])

# K = 5, rows = ground truth. Class 2 is absent from gt and prediction; class 3 is predicted
# but absent from gt; class 4 is in gt but never predicted.
HAND_CM = torch.tensor([
    [3, 1, 0, 0, 0],
    [1, 2, 0, 1, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0],
])
NAN = math.nan


def assert_same(actual, expected):
    """Floats / lists equal to 1e-12, NaN where NaN is expected."""
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float),
                               rtol=0, atol=1e-12)


def random_labels(seed, shape=(3, 17, 19), k=6, ignore_frac=0.15):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignore_frac] = IGN
    # Predictions agree with the target 60% of the time so every metric is away from 0 and 1.
    noise = torch.randint(0, k, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target.clamp_max(k - 1), noise)
    return pred, target


def test_confusion_matrix_hand_example_with_ignore():
    target = torch.tensor([[0, 0, 1, IGN], [2, 1, IGN, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 0]])
    # Counted pairs (gt, pred): (0,0) (0,1) (1,1) (2,2) (1,0) (0,0); the two ignored pixels dropped.
    expected = torch.tensor([[2, 1, 0], [1, 1, 0], [0, 0, 1]])
    cm = metrics.confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)


def test_confusion_matrix_uint8_target_and_custom_ignore():
    target = torch.tensor([[0, 1, 2, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1, 2]])
    # ignore_index=0 drops the background pixels, including the misprediction (0 -> 2).
    expected = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 0]])
    assert torch.equal(metrics.confusion_matrix(pred, target, 3, ignore_index=0), expected)


def test_out_of_range_labels_are_dropped_not_misfiled():
    # With index t*K + p, pred -1 at gt 1 would land in cell (0, 2) and pred 3 at gt 0 in (1, 0);
    # gt -1, 3 and 7 would land outside the matrix. All five must be dropped.
    target = torch.tensor([1, 0, 3, 2, 2, 7, -1])
    pred = torch.tensor([-1, 3, 1, 2, 1, 0, 2])
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 1]])
    assert torch.equal(metrics.confusion_matrix(pred, target, 3), expected)


def test_scores_every_key_by_hand():
    s = metrics.scores(HAND_CM)
    assert_same(s["pixel_acc"], 5 / 9)  # trace 3+2, total 9
    acc = [3 / 4, 2 / 4, NAN, NAN, 0 / 1]
    assert_same(s["acc_per_class"], acc)
    assert_same(s["mean_acc"], (3 / 4 + 2 / 4 + 0) / 3)
    # union = row + col - diag; cols = [5, 3, 0, 1, 0]
    iou = [3 / (4 + 5 - 3), 2 / (4 + 3 - 2), NAN, 0 / (0 + 1), 0 / (1 + 0)]
    assert_same(s["iou_per_class"], iou)
    assert_same(s["miou"], (3 / 6 + 2 / 5 + 0 + 0) / 4)  # class 2 not counted
    assert_same(s["fwiou"], 4 / 9 * 3 / 6 + 4 / 9 * 2 / 5 + 1 / 9 * 0)
    assert_same(s["recall_macro"], (3 / 4 + 2 / 4 + 0) / 3)
    assert_same(s["recall_micro"], 5 / 9)
    precision = [3 / 5, 2 / 3, NAN, 0 / 1, 0.0]  # class 4: in gt, never predicted -> 0
    assert_same(s["precision_per_class"], precision)
    assert_same(s["precision_macro"], (3 / 5 + 2 / 3 + 0 + 0) / 4)
    assert_same(s["precision_micro"], 5 / 9)
    dice = [2 * 3 / (4 + 5), 2 * 2 / (4 + 3), NAN, 0 / (0 + 1), 0 / (1 + 0)]
    assert_same(s["dice_per_class"], dice)
    assert_same(s["dice_macro"], (6 / 9 + 4 / 7 + 0 + 0) / 4)
    assert_same(s["dice_micro"], 5 / 9)
    expected_keys = {
        "pixel_acc", "mean_acc", "acc_per_class", "miou", "iou_per_class", "fwiou",
        "recall_macro", "recall_micro", "precision_per_class",
        "precision_macro", "precision_micro", "dice_per_class", "dice_macro", "dice_micro",
    }
    assert set(s) == expected_keys
    for key, value in s.items():
        assert isinstance(value, float) or all(isinstance(v, float) for v in value), key


def test_all_ignore_gives_zero_matrix_and_nan_scores():
    target = torch.full((2, 3, 3), IGN)
    cm = metrics.confusion_matrix(torch.zeros_like(target), target, 4)
    assert torch.equal(cm, torch.zeros(4, 4, dtype=torch.int64))
    for key, value in metrics.scores(cm).items():
        assert np.isnan(value).all(), key


def test_binary_predict_and_scores():
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 0.5]]]])  # (1, 1, 2, 2): one logit
    pred = metrics.predict(logits)
    assert pred.dtype == torch.int64
    assert pred.tolist() == [[[1, 0], [0, 1]]]  # logit 0 is not foreground (sigmoid 0.5)
    target = torch.tensor([[[1, 1], [IGN, 0]]])
    cm = metrics.confusion_matrix(pred, target, 2)
    assert cm.tolist() == [[0, 1], [1, 1]]
    s = metrics.scores(cm)
    assert_same(s["iou_per_class"], [0 / (1 + 1 - 0), 1 / (2 + 2 - 1)])
    assert_same(s["pixel_acc"], 1 / 3)


def test_predict_multiclass_is_argmax():
    logits = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(metrics.predict(logits), logits.argmax(1))
    with pytest.raises(ValueError, match="logits"):
        metrics.predict(logits[0])


def test_accumulating_two_batches_equals_one_batch():
    p1, t1 = random_labels(1)
    p2, t2 = random_labels(2)
    both = metrics.confusion_matrix(torch.cat([p1, p2]), torch.cat([t1, t2]), 6)
    summed = metrics.confusion_matrix(p1, t1, 6) + metrics.confusion_matrix(p2, t2, 6)
    assert torch.equal(summed, both)
    assert both.sum() == ((t1 != IGN).sum() + (t2 != IGN).sum())


def test_against_independent_numpy_computation():
    pred, target = random_labels(3, shape=(4, 31, 29), k=7)
    pred[pred == 5] = 4  # class 5 in gt but never predicted
    target[target == 6] = 0  # class 6 only predicted
    p, t = pred.numpy(), target.numpy()
    valid = t != IGN
    ious, freq_iou = [], 0.0
    for c in range(7):
        inter = np.sum((t == c) & (p == c) & valid)
        union = np.sum(((t == c) | (p == c)) & valid)
        if union:
            ious.append(inter / union)
            freq_iou += np.sum((t == c) & valid) / valid.sum() * inter / union
    s = metrics.scores(metrics.confusion_matrix(pred, target, 7))
    assert s["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert s["fwiou"] == pytest.approx(freq_iou, abs=1e-12)
    assert s["pixel_acc"] == pytest.approx(np.sum((t == p) & valid) / valid.sum(), abs=1e-12)
    # Single-label micro averages pool to the pixel accuracy (each error is one FN and one FP).
    assert s["recall_micro"] == s["precision_micro"] == pytest.approx(s["pixel_acc"], abs=1e-12)
    assert s["dice_micro"] == pytest.approx(s["pixel_acc"], abs=1e-12)


def test_per_image_reproduces_the_notebook_check():
    def check(fn, average):
        return fn(NB_PRED, NB_TARGET, 3, ignore_index=IGN, average=average, reduce="mean").item()

    assert check(metrics.per_image_recall, "micro") == pytest.approx(0.9286, abs=1e-4)
    assert check(metrics.per_image_recall, "macro") == pytest.approx(0.7500, abs=1e-4)
    assert check(metrics.per_image_iou, "micro") == pytest.approx(0.8667, abs=1e-4)
    assert check(metrics.per_image_iou, "macro") == pytest.approx(0.7115, abs=1e-4)


def test_per_image_by_hand_on_the_notebook_example():
    # Each image: 12 background pixels right, one object pixel right, one object pixel predicted
    # as background, two ignored pixels (one predicted as the object, not counted).
    kw = dict(num_classes=3, reduce="none")
    iou = metrics.per_image_iou(NB_PRED, NB_TARGET, **kw)
    assert_same(iou, [(12 / 13 + 1 / 2) / 2] * 2)
    precision = metrics.per_image_precision(NB_PRED, NB_TARGET, **kw)
    assert_same(precision, [(12 / 13 + 1 / 1) / 2] * 2)
    dice = metrics.per_image_dice(NB_PRED, NB_TARGET, **kw)
    assert_same(dice, [(24 / 25 + 2 / 3) / 2] * 2)
    micro_dice = metrics.per_image_dice(NB_PRED, NB_TARGET, average="micro", **kw)
    assert_same(micro_dice, [2 * 13 / (14 + 14)] * 2)
    iou_sum = metrics.per_image_iou(NB_PRED, NB_TARGET, 3, reduce="sum")
    assert_same(iou_sum, 2 * (12 / 13 + 1 / 2) / 2)


def test_per_image_all_ignore_image_is_nan_and_skipped():
    target = torch.cat([NB_TARGET[:1], torch.full((1, 4, 4), IGN)])
    pred = NB_PRED[:1].repeat(2, 1, 1)
    one = (12 / 13 + 1 / 2) / 2
    for average in ("macro", "micro"):
        none = metrics.per_image_iou(pred, target, 3, average=average, reduce="none")
        assert np.isnan(none[1].item()) and not np.isnan(none[0].item())
    assert_same(metrics.per_image_iou(pred, target, 3, reduce="none")[0], one)
    assert_same(metrics.per_image_iou(pred, target, 3, reduce="mean"), one)
    assert_same(metrics.per_image_iou(pred, target, 3, reduce="sum"), one)
    assert np.isnan(metrics.per_image_recall(pred[1:], target[1:], 3).item())


@pytest.mark.parametrize("kind", ["iou", "recall", "precision", "dice"])
def test_per_image_matches_per_image_confusion_matrices(kind):
    pred, target = random_labels(4, shape=(5, 9, 11), k=5)
    target[2, :, 5:] = 4  # make the classes present differ between images
    target[3][target[3] == 1] = IGN
    fn = getattr(metrics, f"per_image_{kind}")
    macro = fn(pred, target, 5, reduce="none")
    micro = fn(pred, target, 5, average="micro", reduce="none")
    for b in range(5):
        cm = metrics.confusion_matrix(pred[b], target[b], 5)
        key = "acc_per_class" if kind == "recall" else f"{kind}_per_class"  # acc is recall
        per_class = np.asarray(metrics.scores(cm)[key])
        in_gt = cm.sum(1).numpy() > 0
        assert macro[b].item() == pytest.approx(per_class[in_gt].mean(), abs=1e-12)
        tp, n = cm.trace().item(), cm.sum().item()  # pooled: rows and cols both sum to n
        pooled = {"iou": tp / (n + n - tp), "recall": tp / n, "precision": tp / n,
                  "dice": 2 * tp / (n + n)}
        assert micro[b].item() == pytest.approx(pooled[kind], abs=1e-12)


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="average"):
        metrics.per_image_iou(NB_PRED, NB_TARGET, 3, average="weighted")
    with pytest.raises(ValueError, match="reduce"):
        metrics.per_image_recall(NB_PRED, NB_TARGET, 3, reduce="max")
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_matrix(NB_PRED[:1], NB_TARGET, 3)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.confusion_matrix(NB_PRED, NB_TARGET, 0)
    with pytest.raises(ValueError, match="cm"):
        metrics.scores(torch.zeros(2, 3))


def test_confusion_matrix_compiles_without_graph_breaks():
    pred, target = random_labels(5)
    compiled = torch.compile(metrics.confusion_matrix, fullgraph=True, backend="eager")
    assert torch.equal(compiled(pred, target, 6), metrics.confusion_matrix(pred, target, 6))
    compiled_iou = torch.compile(metrics.per_image_iou, fullgraph=True, backend="eager")
    assert torch.equal(compiled_iou(pred, target, 6), metrics.per_image_iou(pred, target, 6))


def test_per_image_counts_sum_to_the_split_scores():
    pred, target = random_labels(7, shape=(6, 9, 11), k=5)
    target[2][target[2] == 3] = IGN
    counts = metrics.per_image_counts(pred, target, 5)
    cm = metrics.confusion_matrix(pred, target, 5)
    assert torch.equal(counts.sum(0), torch.stack([cm.diagonal(), cm.sum(1), cm.sum(0)], -1))
    whole, subset = metrics.scores(cm), metrics.count_scores(counts.sum(0))
    for key in ("miou", "pixel_acc", "mean_acc"):
        assert subset[key].item() == pytest.approx(whole[key], abs=1e-15)
    # any subset of images: its own split-level numbers
    some = [0, 3, 4]
    cm_some = metrics.confusion_matrix(pred[some], target[some], 5)
    assert metrics.count_scores(counts[some].sum(0))["miou"].item() == pytest.approx(
        metrics.scores(cm_some)["miou"], abs=1e-15)
