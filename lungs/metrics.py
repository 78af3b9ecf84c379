"""Per-image overlap of a predicted and a true lung mask: Dice and IoU (empty vs empty counts as 1)."""

from __future__ import annotations

import numpy as np


def dice_iou(pred, truth) -> tuple[float, float]:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    if total == 0:
        return 1.0, 1.0  # both empty: a perfect answer, not 0/0
    union = total - inter
    return float(2 * inter / total), float(inter / union)


def per_image(preds, truths) -> tuple[np.ndarray, np.ndarray]:
    """(N,) Dice and (N,) IoU of (N, S, S) masks."""
    pairs = [dice_iou(p, t) for p, t in zip(preds, truths)]
    arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def summary(dice: np.ndarray, iou: np.ndarray) -> dict:
    """Means (and the spread a reader needs to trust them) of per-image scores."""
    if len(dice) == 0:
        return {"n": 0, "dice": None, "iou": None}
    return {"n": int(len(dice)), "dice": float(np.mean(dice)), "iou": float(np.mean(iou)),
            "dice_median": float(np.median(dice)), "dice_min": float(np.min(dice)), "iou_min": float(np.min(iou))}
