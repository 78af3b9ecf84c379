"""DeLong's test of two correlated AUROCs (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837), computed
with the fast algorithm of Sun & Xu 2014 (IEEE Signal Processing Letters 21:1389).

An AUROC is the Mann-Whitney statistic: the share of (positive, negative) pairs the positive outscores, ties
counting half. Its structural components are, per positive, the share of negatives it outscores (V10) and,
per negative, the share of positives that outscore it (V01); the covariance of k AUROCs measured on the same
images is S10 / m + S01 / n, where S10 and S01 are the k x k sample covariances of the components over the m
positives and the n negatives. DeLong's O(m n) pair counts become midranks (Sun & Xu): a positive's V10 is its
midrank among all images less its midrank among the positives, over n, so k score sets take O(k (m + n) log(m + n)).

The test of A - B: z = (A - B) / sqrt(var A + var B - 2 cov(A, B)), two-sided normal p, and the Wald interval
A - B +- 1.96 se, as pROC's roc.test(method = "delong") reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import rankdata


@dataclass(frozen=True)
class DelongResult:
    """One paired test; None where a value is undefined (`note` says why)."""

    auc_a: float | None
    auc_b: float | None
    difference: float | None  # auc_a - auc_b
    se: float | None  # of the difference
    z: float | None
    p: float | None  # two-sided
    ci_low: float | None  # Wald interval of the difference at `confidence`
    ci_high: float | None
    n_pos: int
    n_neg: int
    note: str | None = None


def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """(k,) AUROCs and their (k, k) DeLong covariance for `scores` (n, k) against 0/1 `y` (n,). Needs at
    least two positives and two negatives (a sample covariance of one value is undefined)."""
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    pos, neg = scores[y].T, scores[~y].T  # (k, m), (k, n)
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's covariance needs two positives and two negatives ({m} and {n} given)")
    tx = rankdata(pos, axis=1)  # midranks: tied scores share their mean rank, so a tie counts half
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n  # per positive: the share of negatives below it (ties half)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: the share of positives above it (ties half)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def _undefined(n_pos: int, n_neg: int, note: str, auc_a=None, auc_b=None) -> DelongResult:
    diff = None if auc_a is None or auc_b is None else auc_a - auc_b
    return DelongResult(auc_a, auc_b, diff, None, None, None, None, None, n_pos, n_neg, note)


def delong_test(y, scores_a, scores_b, confidence: float = 0.95) -> DelongResult:
    """DeLong's paired test of AUROC(scores_a) - AUROC(scores_b) on the same images with truth `y` (0/1).

    Undefined cases give None and a note instead of raising: a class without positives or negatives has no
    AUROC; with one positive or one negative the variance is undefined; a zero variance of the difference
    gives p = 1 for equal AUROCs (identical rankings, as pROC) and no p otherwise."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return _undefined(n_pos, n_neg, f"no {'positives' if n_pos == 0 else 'negatives'}: AUROC undefined")
    scores = np.column_stack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)])
    if not np.isfinite(scores).all():
        raise ValueError("DeLong's test needs finite scores")
    if n_pos < 2 or n_neg < 2:
        tz = rankdata(scores, axis=0)  # the AUROCs are still defined
        a, b = ((tz[y].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).tolist()
        one = "positive" if n_pos < 2 else "negative"
        return _undefined(n_pos, n_neg, f"one {one}: the variance of the difference is undefined", a, b)
    aucs, cov = delong_covariance(y, scores)
    a, b = float(aucs[0]), float(aucs[1])
    diff = a - b
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    scale = float(cov[0, 0] + cov[1, 1])
    if var <= 1e-12 * scale or var <= 0.0:  # rounding leaves ~1e-17 where the components coincide
        if abs(diff) <= 1e-12:
            return DelongResult(a, b, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, n_pos, n_neg,
                                "zero variance of the difference (the same ranking): p = 1")
        return _undefined(n_pos, n_neg, "zero variance of a non-zero difference: no p", a, b)
    se = math.sqrt(var)
    z = diff / se
    half = float(ndtri(0.5 + confidence / 2)) * se
    return DelongResult(a, b, diff, se, z, float(2 * ndtr(-abs(z))), diff - half, diff + half, n_pos, n_neg)


def delong_per_class(y, scores_a, scores_b, mask=None, confidence: float = 0.95) -> list[DelongResult]:
    """delong_test for each column of (n, k) `y`, `scores_a`, `scores_b`, each over its entries in `mask`."""
    y = np.asarray(y)
    valid = np.ones(y.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    return [delong_test(y[valid[:, c], c] == 1, a[valid[:, c], c], b[valid[:, c], c], confidence)
            for c in range(y.shape[1])]


def holm(p_values) -> list[float | None]:
    """Holm's step-down adjustment of a family of p values (None stays None and is not counted): the i-th
    smallest of m is multiplied by m - i + 1, then made monotone, capped at 1."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[i] = running
    return out
