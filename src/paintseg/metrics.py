"""Segmentation metrics: per-class IoU / Dice, and instance matching (AP, F1 at IoU thresholds).

Instance scores follow StarDist's ``matching``: predicted and true objects are paired one to
one by the Hungarian algorithm on their IoU; a pair counts as a true positive at threshold
``t`` when its IoU is at least ``t``. ``AP`` here is StarDist's "accuracy",
``TP / (TP + FP + FN)``, the figure its papers and Cellpose report as average precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["semantic_scores", "instance_scores", "iou_matrix", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if a.dtype.kind not in "biu":
            raise ValueError(f"{name} must hold integer labels, got {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} has negative labels")
    return pred, gt


def semantic_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    classes: Sequence[int] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """IoU and Dice per class value, their means, and pixel accuracy.

    Parameters
    ----------
    pred, gt : array of int
        Label images of the same shape (class values).
    classes : sequence of int, optional
        Class values to score; default: every value in either image.
    mask : array of bool, optional
        Score only these pixels (e.g. held-out painted pixels).

    Returns
    -------
    dict
        ``{"iou": {value: float}, "dice": {...}, "mean_iou": float, "mean_dice": float,
        "accuracy": float, "pixels": int}``. A class absent from both images is left out.
    """
    pred, gt = _check_pair(pred, gt)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        pred, gt = pred[mask], gt[mask]
    pred, gt = pred.ravel(), gt.ravel()
    values = sorted(set(np.unique(pred)) | set(np.unique(gt))) if classes is None else classes
    iou, dice = {}, {}
    for v in values:
        p, g = pred == v, gt == v
        inter = int(np.count_nonzero(p & g))
        union = int(np.count_nonzero(p | g))
        total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
        if union == 0:
            continue
        iou[int(v)] = inter / union
        dice[int(v)] = 2 * inter / total
    return {
        "iou": iou,
        "dice": dice,
        "mean_iou": float(np.mean(list(iou.values()))) if iou else float("nan"),
        "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
        "accuracy": float(np.mean(pred == gt)) if pred.size else float("nan"),
        "pixels": int(pred.size),
    }


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every true object (rows) and predicted object (columns); 0 is background.

    Returns
    -------
    iou : ndarray, shape (n_true, n_pred)
    true_ids, pred_ids : ndarray
        The label values of the rows and columns.
    """
    pred, gt = _check_pair(pred, gt)
    p, g = pred.ravel(), gt.ravel()
    true_ids = np.unique(g[g > 0])
    pred_ids = np.unique(p[p > 0])
    if len(true_ids) == 0 or len(pred_ids) == 0:
        return np.zeros((len(true_ids), len(pred_ids))), true_ids, pred_ids
    gi = np.searchsorted(true_ids, g)
    pi = np.searchsorted(pred_ids, p)
    both = (g > 0) & (p > 0)
    inter = np.zeros((len(true_ids), len(pred_ids)), dtype=np.int64)
    np.add.at(inter, (gi[both], pi[both]), 1)
    area_t = np.bincount(gi[g > 0], minlength=len(true_ids))
    area_p = np.bincount(pi[p > 0], minlength=len(pred_ids))
    union = area_t[:, None] + area_p[None, :] - inter
    return inter / np.maximum(union, 1), true_ids, pred_ids


def instance_scores(
    pred: np.ndarray, gt: np.ndarray, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """Match predicted to true instances and score them at IoU thresholds.

    Returns
    -------
    dict
        ``{"thresholds": [...], "ap": [...], "f1": [...], "precision": [...], "recall": [...],
        "tp": [...], "fp": [...], "fn": [...], "n_true": int, "n_pred": int,
        "mean_matched_iou": float}``, one list entry per threshold.
    """
    iou, true_ids, pred_ids = iou_matrix(pred, gt)
    n_true, n_pred = len(true_ids), len(pred_ids)
    out: dict[str, Any] = {k: [] for k in ("ap", "f1", "precision", "recall", "tp", "fp", "fn")}
    out.update({"thresholds": [float(t) for t in thresholds], "n_true": n_true, "n_pred": n_pred})
    matched_ious: np.ndarray = np.zeros(0)
    if n_true and n_pred:
        rows, cols = linear_sum_assignment(-iou)
        matched_ious = iou[rows, cols]
    for t in thresholds:
        tp = int(np.count_nonzero(matched_ious >= t))
        fp, fn = n_pred - tp, n_true - tp
        out["tp"].append(tp)
        out["fp"].append(fp)
        out["fn"].append(fn)
        out["precision"].append(tp / n_pred if n_pred else 0.0)
        out["recall"].append(tp / n_true if n_true else 0.0)
        denom = tp + fp + fn
        out["ap"].append(tp / denom if denom else 1.0)
        out["f1"].append(2 * tp / (2 * tp + fp + fn) if denom else 1.0)
    good = matched_ious[matched_ious >= 0.5]
    out["mean_matched_iou"] = float(good.mean()) if good.size else 0.0
    return out
