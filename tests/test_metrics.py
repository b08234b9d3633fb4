"""Metrics on hand-made cases: the classifier's, box IoU, mAP@0.5 and the RSNA score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.metrics import (
    RSNA_IOU_THRESHOLDS,
    average_precision_50,
    box_iou,
    classification_metrics,
    roc_auc,
    rsna_image_score,
    rsna_score,
)

NAN = float("nan")
BOX = [0.0, 0.0, 10.0, 10.0]
FAR = [100.0, 100.0, 110.0, 110.0]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def _p(*rows: list[float]) -> np.ndarray:
    """Predictions (M, 5)."""
    return np.array(rows, dtype=float).reshape(-1, 5)


def _t(*rows: list[float]) -> np.ndarray:
    """Truths (K, 4)."""
    return np.array(rows, dtype=float).reshape(-1, 4)


# ---------------------------------------------------------------------------------------
# box_iou
# ---------------------------------------------------------------------------------------

IOU_CASES = [
    # a, b, expected IoU
    (BOX, BOX, 1.0),
    (BOX, FAR, 0.0),
    (BOX, [0, 0, 10, 5], 0.5),
    (BOX, [5, 0, 15, 10], 50 / 150),
    (BOX, [2, 2, 4, 4], 4 / 100),  # contained
    (BOX, [10, 0, 20, 10], 0.0),  # touching edges
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # degenerate: empty union
]


@pytest.mark.parametrize(("a", "b", "expected"), IOU_CASES)
def test_box_iou_pairs(a: list[float], b: list[float], expected: float) -> None:
    assert box_iou([a], [b])[0, 0] == pytest.approx(expected)
    assert box_iou([b], [a])[0, 0] == pytest.approx(expected)  # symmetric


def test_box_iou_matrix_matches_pairs_and_handles_empty() -> None:
    a = np.array([c[0] for c in IOU_CASES], dtype=float)
    b = np.array([c[1] for c in IOU_CASES], dtype=float)
    full = box_iou(a, b)
    assert full.shape == (len(a), len(b))
    for i in range(len(a)):
        for j in range(len(b)):
            assert full[i, j] == pytest.approx(box_iou(a[i : i + 1], b[j : j + 1])[0, 0])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, len(b))
    assert box_iou(a, []).shape == (len(a), 0)
    assert box_iou(_p([0, 0, 10, 10, 0.9]), [BOX])[0, 0] == 1.0  # a conf column is ignored


# ---------------------------------------------------------------------------------------
# RSNA score
# ---------------------------------------------------------------------------------------

RSNA_CASES = [
    # id, preds per image, truths per image, expected
    ("perfect", [_p(BOX + [0.9])], [_t(BOX)], 1.0),
    ("perfect_two_boxes", [_p(BOX + [0.9], FAR + [0.8])], [_t(BOX, FAR)], 1.0),
    ("all_wrong", [_p(FAR + [0.9])], [_t(BOX)], 0.0),
    ("missed", [_p()], [_t(BOX)], 0.0),
    ("empty_image_skipped", [_p(), _p(BOX + [0.9])], [_t(), _t(BOX)], 1.0),
    ("no_truth_with_prediction_scores_0", [_p(BOX + [0.1]), _p(BOX + [0.9])], [_t(), _t(BOX)], 0.5),
    # IoU 0.625 beats 0.40 .. 0.60 (5 thresholds) but not 0.65 .. 0.75: 5 / 8.
    ("iou_0625", [_p([0, 0, 10, 6.25, 0.9])], [_t(BOX)], 5 / 8),
    # IoU exactly 0.5 must be *above* the threshold: only 0.40 and 0.45 count.
    ("iou_exactly_half_is_strict", [_p([0, 0, 10, 5, 0.9])], [_t(BOX)], 2 / 8),
    # Two identical predictions on one truth: TP 1, FP 1 at every threshold.
    ("duplicate_predictions", [_p(BOX + [0.9], BOX + [0.8])], [_t(BOX)], 0.5),
    # One prediction for two truths: TP 1, FN 1.
    ("one_of_two_found", [_p(BOX + [0.9])], [_t(BOX, FAR)], 0.5),
    # The confident prediction takes the truth at IoU 0.625; the exact one becomes a FP
    # there, but at 0.65+ the confident one cannot match and the exact one does.
    ("two_predictions_one_truth", [_p([0, 0, 10, 6.25, 0.9], BOX + [0.5])], [_t(BOX)], 0.5),
]


@pytest.mark.parametrize(("preds", "truths", "expected"), [c[1:] for c in RSNA_CASES],
                         ids=[c[0] for c in RSNA_CASES])
def test_rsna_score(preds: list[np.ndarray], truths: list[np.ndarray], expected: float) -> None:
    assert rsna_score(preds, truths) == pytest.approx(expected)


def test_rsna_score_all_skipped_is_nan() -> None:
    assert math.isnan(rsna_score([_p(), _p()], [_t(), _t()]))
    assert rsna_image_score(_p(), _t()) is None
    assert math.isnan(rsna_score([], []))


# height of a prediction [0, 0, 10, h] on the truth BOX (IoU h / 10), the image's score: the
# fraction of the thresholds 0.40, 0.45, ..., 0.75 that the IoU exceeds
THRESHOLD_CASES = [
    (3.9, 0 / 8),  # below 0.40: a miss at every threshold
    (4.2, 1 / 8),  # only 0.40
    (6.8, 6 / 8),  # 0.40 to 0.65
    (7.6, 8 / 8),  # all of them
]


@pytest.mark.parametrize(("height", "expected"), THRESHOLD_CASES, ids=[f"iou{h / 10:.2f}" for h, _ in THRESHOLD_CASES])
def test_rsna_image_score_counts_the_thresholds_the_iou_exceeds(height: float, expected: float) -> None:
    assert len(RSNA_IOU_THRESHOLDS) == 8
    assert rsna_image_score(_p([0.0, 0.0, 10.0, height, 0.9]), _t(BOX)) == pytest.approx(expected)


def test_rsna_score_order_of_predictions_does_not_matter() -> None:
    rng = np.random.default_rng(0)
    truths = [_t(BOX, [20, 20, 40, 45])]
    xy = rng.uniform(0, 30, size=(6, 2))
    preds = np.concatenate([xy, xy + rng.uniform(5, 20, size=(6, 2)), rng.random((6, 1))], axis=1)
    expected = rsna_score([preds], truths)
    assert rsna_score([preds[::-1]], truths) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("preds", "truths", "match"),
    [
        ([_p()], [], "images"),
        ([np.zeros((2, 4))], [_t(BOX)], r"\(M, 5\)"),
        ([_p()], [np.zeros((1, 5))], r"\(K, 4\)"),
        ([_p(BOX + [NAN])], [_t(BOX)], "non-finite"),
    ],
)
def test_detection_metrics_reject_bad_input(preds: list, truths: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rsna_score(preds, truths)
    with pytest.raises(ValueError, match=match):
        average_precision_50(preds, truths)


# ---------------------------------------------------------------------------------------
# AP@0.5
# ---------------------------------------------------------------------------------------

AP_CASES = [
    ("perfect", [_p(BOX + [0.9])], [_t(BOX)], 1.0),
    ("no_predictions", [_p()], [_t(BOX)], 0.0),
    ("no_truths_is_nan", [_p(BOX + [0.9])], [_t()], NAN),
    ("all_false_positives", [_p(FAR + [0.9])], [_t(BOX)], 0.0),
    # TP .9, FP .8, TP .7 over 2 truths: recall .5 at precision 1, recall 1 at 2/3.
    ("tp_fp_tp", [_p(BOX + [0.9], [50, 50, 60, 60, 0.8], FAR + [0.7])], [_t(BOX, FAR)],
     0.5 + 0.5 * 2 / 3),
    # A duplicate after the match is a FP at recall 1: AP stays 1.
    ("duplicate_after_match", [_p(BOX + [0.9], BOX + [0.8])], [_t(BOX)], 1.0),
    # A FP ranked first: precision 1/2 at the only recall step.
    ("false_positive_first", [_p(FAR + [0.9], BOX + [0.8])], [_t(BOX)], 0.5),
    # Ranking is across images: the FP of image 2 outranks the TP of image 1.
    ("across_images", [_p(BOX + [0.5]), _p(FAR + [0.9])], [_t(BOX), _t(BOX)], 0.5 * 0.5),
    ("iou_exactly_half_matches", [_p([0, 0, 10, 5, 0.9])], [_t(BOX)], 1.0),
    ("iou_below_half", [_p([0, 0, 10, 4.9, 0.9])], [_t(BOX)], 0.0),
    ("empty_images_ignored", [_p(), _p(BOX + [0.9])], [_t(), _t(BOX)], 1.0),
]


@pytest.mark.parametrize(("preds", "truths", "expected"), [c[1:] for c in AP_CASES],
                         ids=[c[0] for c in AP_CASES])
def test_average_precision_50(
    preds: list[np.ndarray], truths: list[np.ndarray], expected: float
) -> None:
    assert _same(average_precision_50(preds, truths), expected)


# ---------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------


def _pairwise_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Brute force: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


CLS_CASES = [
    # id, probs, targets, kwargs, expected subset
    ("perfect", [0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0], {},
     dict(accuracy=1.0, roc_auc=1.0, sensitivity=1.0, specificity=1.0, precision=1.0, f1=1.0,
          baseline_accuracy=0.5, n=4, positives=2)),
    ("all_wrong", [0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0], {},
     dict(accuracy=0.0, roc_auc=0.0, sensitivity=0.0, specificity=0.0, precision=0.0, f1=0.0)),
    ("all_negative_answers", [0.1, 0.1, 0.1, 0.1], [1, 0, 0, 0], {},
     dict(accuracy=0.75, baseline_accuracy=0.75, roc_auc=0.5, sensitivity=0.0, specificity=1.0,
          precision=NAN, f1=0.0)),
    ("one_class_auc_nan", [0.3, 0.6], [0, 0], {},
     dict(roc_auc=NAN, sensitivity=NAN, specificity=0.5, positives=0)),
    ("threshold_inclusive", [0.5, 0.49], [1, 0], {}, dict(accuracy=1.0, tp=1, tn=1)),
    ("threshold_custom", [0.7, 0.6, 0.2], [1, 0, 0], {"threshold": 0.65},
     dict(accuracy=1.0, precision=1.0, threshold=0.65)),
    ("mask_drops_padding", [0.9, 0.1, 0.9, 0.9], [1, 0, 0, 0], {"mask": [1, 1, 0, 0]},
     dict(accuracy=1.0, n=2, positives=1, fp=0)),
    ("ties_half_credit", [0.5, 0.5], [1, 0], {}, dict(roc_auc=0.5)),
]


@pytest.mark.parametrize(("probs", "targets", "kwargs", "expected"), [c[1:] for c in CLS_CASES],
                         ids=[c[0] for c in CLS_CASES])
def test_classification_metrics(probs: list, targets: list, kwargs: dict, expected: dict) -> None:
    got = classification_metrics(probs, targets, **kwargs)
    for key, value in expected.items():
        assert _same(got[key], value), (key, got[key], value)
    assert got["tp"] + got["fp"] + got["tn"] + got["fn"] == got["n"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [3, 10, 1000])  # few levels: many ties
def test_auc_matches_pairwise_brute_force(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=200)
    scores = rng.integers(0, levels, size=200) / levels + 0.2 * targets * rng.random(200)
    assert roc_auc(scores, targets) == pytest.approx(_pairwise_auc(scores, targets), abs=1e-12)
    got = classification_metrics(np.clip(scores, 0, 1), targets)["roc_auc"]
    assert got == pytest.approx(_pairwise_auc(np.clip(scores, 0, 1), targets), abs=1e-12)


@pytest.mark.parametrize(
    ("probs", "targets", "kwargs", "match"),
    [
        ([0.1, 0.2], [0], {}, "targets"),
        ([0.1, NAN], [0, 1], {}, "non-finite"),
        ([0.1, 0.2], [0, 2], {}, "0 or 1"),
        ([0.1, 0.2], [0, 1], {"threshold": 1.5}, "threshold"),
        ([0.1, 0.2], [0, 1], {"mask": [1]}, "mask"),
    ],
)
def test_classification_metrics_reject_bad_input(
    probs: list, targets: list, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, targets, **kwargs)


def test_classification_metrics_empty_after_mask_is_nan() -> None:
    got = classification_metrics([0.9], [1], mask=[False])
    assert got["n"] == 0 and math.isnan(got["accuracy"]) and math.isnan(got["roc_auc"])


# ---------------------------------------------------------------------------------------
# Cross-checks against independent implementations on the same inputs
# ---------------------------------------------------------------------------------------


def _random_detections(seed: int, images: int = 40) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image 0-3 truths; predictions are jittered truths (some far off) plus less
    confident clutter, with distinct confidences (ultralytics sorts unstably: no ties)."""
    rng = np.random.default_rng(seed)
    preds, truths = [], []
    for _ in range(images):
        xy = rng.uniform(0, 500, size=(rng.integers(0, 4), 2))
        t = np.concatenate([xy, xy + rng.uniform(40, 140, size=xy.shape)], axis=1)
        hits = t + rng.normal(0, 1, size=t.shape) * rng.uniform(2, 30, size=(len(t), 1))
        hits = hits[rng.random(len(t)) < 0.8]
        xy = rng.uniform(0, 500, size=(rng.integers(0, 3), 2))
        clutter = np.concatenate([xy, xy + rng.uniform(30, 120, size=xy.shape)], axis=1)
        boxes = np.concatenate([hits, clutter])
        conf = np.concatenate([rng.uniform(0.3, 1.0, len(hits)), rng.uniform(0.0, 0.7, len(clutter))])
        preds.append(np.concatenate([boxes, conf[:, None]], axis=1))
        truths.append(t)
    return preds, truths


def _ultralytics_ap50(preds: list[np.ndarray], truths: list[np.ndarray]) -> tuple[float, float]:
    """AP@0.5 the way ultralytics' validator computes it: its matching
    (``BaseValidator.match_predictions``), its box IoU and ``ap_per_class``.

    Returns:
        Its 101-point interpolated AP, and the all-point integral of its precision
        envelope (the interpolation :func:`average_precision_50` uses).
    """
    import torch
    from types import SimpleNamespace

    from train.models.yolo import load_ultralytics

    load_ultralytics()  # offline settings before the first ultralytics import
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou as ul_box_iou, compute_ap

    holder = SimpleNamespace(iouv=torch.tensor([0.5]))
    tp, conf = [], []
    for p, t in zip(preds, truths):
        p = p[np.argsort(-p[:, 4])]
        iou = ul_box_iou(torch.from_numpy(t), torch.from_numpy(p[:, :4]))  # (truths, preds)
        tp.append(BaseValidator.match_predictions(holder, torch.zeros(len(p)), torch.zeros(len(t)), iou).numpy())
        conf.append(p[:, 4])
    tp_all, conf_all = np.concatenate(tp), np.concatenate(conf)
    n_truth = sum(len(t) for t in truths)
    ap101 = float(ap_per_class(tp_all, conf_all, np.zeros(len(conf_all)), np.zeros(n_truth))[5][0, 0])
    order = np.argsort(-conf_all)
    tpc = np.cumsum(tp_all[order, 0])
    _, mpre, mrec = compute_ap(tpc / n_truth, tpc / np.arange(1, len(tpc) + 1))
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    all_point = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    return ap101, all_point


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ap50_agrees_with_ultralytics(seed: int) -> None:
    preds, truths = _random_detections(seed)
    ours = average_precision_50(preds, truths)
    ap101, all_point = _ultralytics_ap50(preds, truths)
    assert 0.15 < ours < 0.95  # a curve with something to integrate
    # same matches, same precision envelope: the all-point integrals are equal ...
    assert ours == pytest.approx(all_point, abs=1e-9)
    # ... and ultralytics' 101-point (COCO) sampling of it differs by under 1/100
    assert abs(ours - ap101) < 0.01


def _trapezoid_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the empirical ROC curve by the trapezoid rule over distinct thresholds
    (a tie between a positive and a negative is a diagonal step: half credit)."""
    thresholds = np.unique(scores)[::-1]
    pos, neg = targets == 1, targets == 0
    tpr = [0.0] + [float((scores[pos] >= c).mean()) for c in thresholds]
    fpr = [0.0] + [float((scores[neg] >= c).mean()) for c in thresholds]
    return float(np.sum(np.diff(fpr) * (np.array(tpr[1:]) + np.array(tpr[:-1])) / 2))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("levels", [4, 50, 100_000])
def test_auc_agrees_with_the_trapezoid_roc_curve(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=300)
    scores = np.round(rng.random(300) * 0.7 + 0.3 * targets, int(np.log10(levels)))
    assert roc_auc(scores, targets) == pytest.approx(_trapezoid_auc(scores, targets), abs=1e-12)
