"""Evaluation metrics for the classifier and the detector, in pure numpy.

No torch here: callers gather predictions to numpy (on rank 0, or per rank and then
``all_gather_object``) and call these functions. Boxes are ``[x1, y1, x2, y2]`` in one
pixel frame (the 640-px letterbox frame of the shards); predictions carry a confidence as
a fifth column.

Conventions:
    * A metric whose denominator is empty (sensitivity without positives, AUC with one
      class, AP without truths, ...) is ``nan``, never a silent 0 or 1.
    * Inputs are validated and a ``ValueError`` names the bad argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "average_precision_50",
    "box_iou",
    "classification_metrics",
    "roc_auc",
    "rsna_image_score",
    "rsna_score",
]

#: IoU thresholds of the RSNA Pneumonia Detection Challenge metric: 0.40, 0.45, ..., 0.75.
RSNA_IOU_THRESHOLDS: tuple[float, ...] = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)


# ---------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------


def _safe_div(num: float, den: float) -> float:
    """``num / den``, or ``nan`` when the denominator is zero (metric undefined)."""
    return float(num) / float(den) if den else float("nan")


def _average_ranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``x``, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each group of equal values
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def roc_auc(scores: ArrayLike, targets: ArrayLike) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), exact with ties.

    Equals the probability that a random positive scores above a random negative, a tie
    counting one half, and the trapezoid-rule area under the empirical ROC curve (the
    tests check both on the same inputs).

    Args:
        scores: (N,) scores, higher meaning more likely positive.
        targets: (N,) 0/1 labels.

    Returns:
        The AUC, or ``nan`` when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(targets).reshape(-1).astype(bool)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(
    probs: ArrayLike,
    targets: ArrayLike,
    threshold: float = 0.5,
    *,
    mask: ArrayLike | None = None,
) -> dict[str, float | int]:
    """Binary classification metrics at one threshold, plus the threshold-free ROC AUC.

    Args:
        probs: (N,) predicted probabilities of the positive class (any monotone score
            works for ``roc_auc``; the threshold applies to these values).
        targets: (N,) labels, 0 or 1.
        threshold: A sample is predicted positive when ``prob >= threshold``.
        mask: Optional (N,) booleans; only samples where it is true count (drops the
            padding added to make every rank's batches the same size).

    Returns:
        ``accuracy``, ``roc_auc``, ``sensitivity`` (recall), ``specificity``,
        ``precision``, ``f1``, ``baseline_accuracy`` (accuracy of always answering
        negative), the counts ``n``, ``positives``, ``tp``, ``fp``, ``tn``, ``fn``, and the
        ``threshold``. Undefined ratios are ``nan``.

    Raises:
        ValueError: Mismatched shapes, non-finite probabilities, labels other than 0/1, a
            threshold outside [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    t_raw = np.asarray(targets).reshape(-1)
    if p.shape != t_raw.shape:
        raise ValueError(f"probs has {p.size} values but targets has {t_raw.size}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if mask is not None:
        m = np.asarray(mask).reshape(-1)
        if m.shape != p.shape:
            raise ValueError(f"mask has {m.size} values but probs has {p.size}")
        keep = m.astype(bool)
        p, t_raw = p[keep], t_raw[keep]
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains non-finite values (nan or inf)")
    if not np.all((t_raw == 0) | (t_raw == 1)):
        bad = np.unique(t_raw[(t_raw != 0) & (t_raw != 1)])[:5].tolist()
        raise ValueError(f"targets must be 0 or 1, found {bad}")

    t = t_raw.astype(bool)
    pred = p >= threshold
    tp = int(np.sum(pred & t))
    fp = int(np.sum(pred & ~t))
    tn = int(np.sum(~pred & ~t))
    fn = int(np.sum(~pred & t))
    n = int(t.size)
    positives = tp + fn
    return {
        "accuracy": _safe_div(tp + tn, n),
        "roc_auc": roc_auc(p, t),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "precision": _safe_div(tp, tp + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "baseline_accuracy": _safe_div(n - positives, n),
        "n": n,
        "positives": positives,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }


# ---------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------


def box_iou(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """Pairwise IoU of two sets of ``[x1, y1, x2, y2]`` boxes.

    Args:
        a: (N, 4) boxes (extra columns, such as a confidence, are ignored).
        b: (M, 4) boxes.

    Returns:
        (N, M) IoU; 0 where the union is empty (two degenerate boxes).
    """
    a = _as_boxes(a, 4, "a")[:, :4]
    b = _as_boxes(b, 4, "b")[:, :4]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _as_boxes(
    x: ArrayLike, min_cols: int, name: str, shape: str | None = None
) -> NDArray[np.float64]:
    """``x`` as a float64 (K, C) array with C >= ``min_cols``; empty input gives (0, C).

    ``shape`` describes the expected shape in the error message.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, max(min_cols, arr.shape[-1] if arr.ndim == 2 else 0)))
    if arr.ndim != 2 or arr.shape[1] < min_cols:
        raise ValueError(f"{name} must have shape {shape or f'(K, {min_cols}+)'}, got {arr.shape}")
    return arr


def _check_pairs(
    preds: Sequence[ArrayLike], truths: Sequence[ArrayLike]
) -> list[tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Validate per-image predictions (M, 5) and truths (K, 4); return them as arrays."""
    if len(preds) != len(truths):
        raise ValueError(f"preds has {len(preds)} images but truths has {len(truths)}")
    out = []
    for i, (p, t) in enumerate(zip(preds, truths)):
        p_shape, t_shape = "(M, 5) [x1,y1,x2,y2,conf]", "(K, 4) [x1,y1,x2,y2]"
        pa = _as_boxes(p, 5, f"preds[{i}]", p_shape)
        ta = _as_boxes(t, 4, f"truths[{i}]", t_shape)
        if pa.shape[1] != 5:
            raise ValueError(f"preds[{i}] must have shape {p_shape}, got {pa.shape}")
        if ta.shape[1] != 4:
            raise ValueError(f"truths[{i}] must have shape {t_shape}, got {ta.shape}")
        if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(ta))):
            raise ValueError(f"image {i} has non-finite boxes or confidences")
        out.append((pa, ta))
    return out


def _greedy_match(iou: NDArray[np.float64], threshold: float, *, strict: bool) -> NDArray[np.bool_]:
    """Match predictions (rows, already in descending confidence) to truths (columns).

    Each prediction in turn takes the unmatched truth it overlaps most, if that overlap
    passes the threshold (``>`` when ``strict``, else ``>=``); each truth is matched at
    most once.

    Returns:
        (M,) booleans: which predictions are true positives.
    """
    n_pred, n_true = iou.shape
    is_tp = np.zeros(n_pred, dtype=bool)
    if n_true == 0:
        return is_tp
    free = np.ones(n_true, dtype=bool)
    for i in range(n_pred):
        cand = np.where(free, iou[i], -1.0)
        j = int(np.argmax(cand))
        ok = cand[j] > threshold if strict else cand[j] >= threshold
        if ok:
            is_tp[i] = True
            free[j] = False
    return is_tp


def _by_confidence(pred: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rows of ``pred`` sorted by descending confidence, ties kept in input order."""
    return pred[np.argsort(-pred[:, 4], kind="stable")]


def average_precision_50(
    preds: Sequence[ArrayLike],
    truths: Sequence[ArrayLike],
    iou_threshold: float = 0.5,
) -> float:
    """Single-class average precision at IoU 0.5 (mAP@0.5 with one class).

    Within each image, predictions in descending confidence take the best-overlapping
    unmatched truth with IoU >= ``iou_threshold`` (COCO matching); an unmatched
    prediction is a false positive. The precision-recall curve is built over the
    detections of all images sorted by confidence and made monotone (the precision
    envelope: precision at recall r is the best precision at any recall >= r).

    Interpolation: all-point, as in PASCAL VOC 2010 and later: the envelope is integrated
    exactly, as a step function, over every recall at which it changes; there is no
    sampling. COCO and ultralytics (``ultralytics.utils.metrics.compute_ap``) instead
    sample the same envelope at 101 recalls 0, 0.01, ..., 1 and integrate with the
    trapezoid rule; the two differ by less than 0.01. ``tests/test_metrics.py`` checks
    this function against ultralytics' matching and envelope on random detections
    (equal all-point integrals, 101-point value within 0.01).

    Args:
        preds: Per image, (M, 5) ``[x1, y1, x2, y2, conf]``.
        truths: Per image, (K, 4) ``[x1, y1, x2, y2]``.
        iou_threshold: Minimum IoU for a match.

    Returns:
        AP in [0, 1]; ``nan`` when there are no truths at all.

    Raises:
        ValueError: Mismatched lengths or malformed arrays.
    """
    pairs = _check_pairs(preds, truths)
    n_truth = sum(len(t) for _, t in pairs)
    if n_truth == 0:
        return float("nan")
    confs, flags = [], []
    for pred, truth in pairs:
        pred = _by_confidence(pred)
        flags.append(_greedy_match(box_iou(pred, truth), iou_threshold, strict=False))
        confs.append(pred[:, 4])
    conf = np.concatenate(confs) if confs else np.zeros(0)
    tp_flag = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
    if conf.size == 0:
        return 0.0
    order = np.argsort(-conf, kind="stable")
    tp = np.cumsum(tp_flag[order])
    fp = np.cumsum(~tp_flag[order])
    recall = tp / n_truth
    precision = tp / (tp + fp)
    # Envelope: precision at recall r is the best precision at any recall >= r.
    mrec = np.concatenate(([0.0], recall))
    mpre = np.concatenate(([1.0], precision))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def rsna_image_score(
    pred: ArrayLike,
    truth: ArrayLike,
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> float | None:
    """The RSNA score of one image (see :func:`rsna_score`); ``None`` when skipped."""
    (p, t), = _check_pairs([pred], [truth])
    if len(p) == 0 and len(t) == 0:
        return None
    if len(t) == 0 or len(p) == 0:
        return 0.0  # all false positives, or all false negatives
    p = _by_confidence(p)
    iou = box_iou(p, t)
    total = 0.0
    for thr in thresholds:
        n_tp = int(_greedy_match(iou, thr, strict=True).sum())
        n_fp = len(p) - n_tp
        n_fn = len(t) - n_tp
        total += n_tp / (n_tp + n_fp + n_fn)
    return total / len(thresholds)


def rsna_score(
    preds: Sequence[ArrayLike],
    truths: Sequence[ArrayLike],
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> float:
    """The RSNA Pneumonia Detection Challenge metric.

    Per image and IoU threshold ``t`` in 0.40, 0.45, ..., 0.75: predictions in
    descending confidence are matched greedily to the unmatched truth they overlap most,
    a match needing IoU > ``t`` (strictly, as the competition states it); each truth is
    matched at most once. The image's score at ``t`` is TP / (TP + FP + FN), and its score
    is the mean over thresholds. An image with neither truths nor predictions is skipped;
    one with no truth but any prediction scores 0 (so does one with truths and no
    prediction). The result is the mean over the images not skipped.

    Confidence only sets the matching order: every prediction passed in counts, so pick
    a confidence threshold before calling this (the score punishes low-confidence
    false positives).

    Args:
        preds: Per image, (M, 5) ``[x1, y1, x2, y2, conf]``.
        truths: Per image, (K, 4) ``[x1, y1, x2, y2]``.
        thresholds: IoU thresholds to average over.

    Returns:
        The score in [0, 1]; ``nan`` when every image is skipped.

    Raises:
        ValueError: Mismatched lengths or malformed arrays.
    """
    pairs = _check_pairs(preds, truths)
    scores = [rsna_image_score(p, t, thresholds) for p, t in pairs]
    kept = [s for s in scores if s is not None]
    return float(np.mean(kept)) if kept else float("nan")
