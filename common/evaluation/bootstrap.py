"""Seeded bootstrap intervals of per-class and mean AUROC, resampling patients.

A patient's images are correlated, so image-level resampling would understate the spread of a
small test set: each draw takes as many patients as the split has, with replacement, and every
image of a drawn patient comes along once per draw. A draw's AUROC weighs each image by its
patient's count, so it equals roc_auc_score on the explicit resample (ties half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _mask(y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.ones(y.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def _names(names, k: int) -> list[str]:
    return list(names) if names is not None else [str(i) for i in range(k)]


BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0
CI_PERCENTILES = (2.5, 97.5)  # a 95% percentile interval
MIN_VALID_DRAWS = 100  # and at least half the draws; with fewer a percentile is mostly noise


def check_draws(draws: int) -> int:
    """--bootstrap-draws as every command takes it: 0 (no intervals) or enough for a percentile."""
    if draws != 0 and draws < MIN_VALID_DRAWS:
        raise ValueError(f"--bootstrap-draws {draws}: 0 (no intervals) or at least {MIN_VALID_DRAWS}")
    return draws


_CHUNK = 50  # draws weighed at once: a (50, images) float64 block, ~10 MB for NIH's 25,596 test images
# A draw's mean AUROC: over the classes with a positive and a negative in that draw; a class without
# an AUROC on the whole split has none in any draw, so the mean is over (a subset of) the report's.
MEAN_RULE = "per draw, the mean over the classes that have a positive and a negative in that draw"


def patient_groups(patient_ids, n: int) -> tuple[np.ndarray, str, list[str]]:
    """(n,) index of each image's resampling unit, the unit ("patient" or "image") and notes.

    Without patient ids every image is its own unit; an image whose id is missing is a patient of its own."""
    if patient_ids is None:
        return np.arange(n), "image", ["no patient ids: AUROC intervals resample images, "
                                       "too narrow where patients have several images"]
    import pandas as pd  # only here (None and NaN alike), so the flags' defaults above import without it

    ids = np.asarray(patient_ids, dtype=object)
    missing = pd.isna(ids)
    groups = np.empty(n, dtype=np.intp)
    groups[~missing] = np.unique(ids[~missing].astype(str), return_inverse=True)[1]
    start = groups[~missing].max() + 1 if (~missing).any() else 0
    groups[missing] = start + np.arange(int(missing.sum()))
    notes = [f"{int(missing.sum())} images without a patient id resampled as patients of their own"] if missing.any() else []
    return groups, "patient", notes


def bootstrap_counts(n_units: int, draws: int, rng: np.random.Generator):
    """(k, n_units) blocks of how often each unit is drawn, `n_units` draws with replacement per row,
    _CHUNK rows at a time (fixed, so one seed gives the same draws whatever the data's size)."""
    for start in range(0, draws, _CHUNK):
        k = min(_CHUNK, draws - start)
        picks = rng.integers(0, n_units, size=(k, n_units)) + n_units * np.arange(k)[:, None]
        yield np.bincount(picks.ravel(), minlength=k * n_units).reshape(k, n_units)


def weighted_auroc(w_pos: np.ndarray, w_neg: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """AUROC per column of integer weights, an image of weight w counting as w copies (so a
    resample's AUROC, ties half, as roc_auc_score gives it). w_pos (n_pos, k) weighs the positives,
    w_neg (n_neg, k) the negatives in ascending score order; lo / hi (n_pos,) count the negatives
    scored below / at most each positive. NaN in a column without positive or negative weight."""
    cum = np.zeros((len(w_neg) + 1, w_neg.shape[1]), dtype=w_neg.dtype)
    np.cumsum(w_neg, axis=0, out=cum[1:])
    # Negatives below a positive, plus half those tied with it: the mean of the two cumulative sums.
    num = 0.5 * np.einsum("ij,ij->j", w_pos, cum[lo] + cum[hi], dtype=np.float64)
    den = w_pos.sum(axis=0) * cum[-1]
    out = np.full(w_neg.shape[1], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def bootstrap_auroc_draws(y, scores, groups: np.ndarray, mask=None, draws: int = BOOTSTRAP_DRAWS,
                          seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(draws, labels) AUROC of each resample of the units in `groups` (all images of a drawn unit
    come along, once per draw); each class over its valid entries, as per_class_auroc. NaN where a
    draw has no positive or no negative of that class."""
    y, scores = np.asarray(y), np.asarray(scores)
    valid = _mask(y, mask)
    classes = []  # per class, fixed across draws: units of its positives and sorted negatives, lo, hi
    for c in range(y.shape[1]):
        pos = valid[:, c] & (y[:, c] == 1)
        neg = valid[:, c] & (y[:, c] == 0)
        if not (pos.any() and neg.any()):
            classes.append(None)
            continue
        order = np.argsort(scores[neg, c], kind="stable")
        s_neg, s_pos = scores[neg, c][order], scores[pos, c]
        classes.append((groups[pos], groups[neg][order], np.searchsorted(s_neg, s_pos, "left"),
                        np.searchsorted(s_neg, s_pos, "right")))
    out = np.full((draws, y.shape[1]), np.nan)
    if not any(classes):
        return out
    n_units, done = int(groups.max()) + 1, 0
    for counts in bootstrap_counts(n_units, draws, np.random.default_rng(seed)):
        # (units, k): rows gather fast; int32 counts (exact, half float64's memory traffic: the cumulative sums
        # over the negatives are most of a draw's time)
        per_unit = np.ascontiguousarray(counts.T, dtype=np.int32)
        for c, prepared in enumerate(classes):
            if prepared is not None:
                unit_pos, unit_neg, lo, hi = prepared
                out[done:done + len(counts), c] = weighted_auroc(per_unit[unit_pos], per_unit[unit_neg], lo, hi)
        done += len(counts)
    return out


def needed_draws(draws: int) -> int:
    """Valid draws an interval needs: MIN_VALID_DRAWS, and at least half the draws."""
    return max(MIN_VALID_DRAWS, math.ceil(draws / 2))


def percentile_interval(values: np.ndarray, draws: int) -> tuple[float, float, int]:
    """(low, high, valid draws) of the finite values; NaN bounds with fewer than needed_draws."""
    ok = values[np.isfinite(values)]
    if len(ok) < needed_draws(draws):
        return float("nan"), float("nan"), len(ok)
    low, high = np.percentile(ok, CI_PERCENTILES)
    return float(low), float(high), len(ok)


@dataclass
class AurocIntervals:
    low: np.ndarray  # (labels,) NaN where not reported
    high: np.ndarray
    valid: np.ndarray  # (labels,) int: draws with a positive and a negative of the class
    mean_low: float
    mean_high: float
    mean_valid: int
    settings: dict  # what metrics.json records under "bootstrap"
    notes: list[str] = field(default_factory=list)


def bootstrap_auroc(y, scores, mask=None, patient_ids=None, names=None, draws: int = BOOTSTRAP_DRAWS,
                    seed: int = BOOTSTRAP_SEED) -> AurocIntervals:
    """95% percentile intervals of per-class and mean AUROC from a seeded bootstrap over patients
    (over images, with a note, without patient ids). The mean of a draw follows MEAN_RULE."""
    y = np.asarray(y)
    valid, names = _mask(y, mask), _names(names, y.shape[1])
    groups, unit, notes = patient_groups(patient_ids, len(y))
    aucs = bootstrap_auroc_draws(y, scores, groups, valid, draws, seed)
    scored = (((y == 1) & valid).any(axis=0) & ((y == 0) & valid).any(axis=0))  # AUROC defined on the whole split
    low, high, n_valid = (np.full(y.shape[1], np.nan) for _ in range(3))
    need = needed_draws(draws)
    for c in range(y.shape[1]):
        low[c], high[c], n_valid[c] = percentile_interval(aucs[:, c], draws)
        if scored[c] and np.isnan(low[c]):
            notes.append(f"{names[c]}: no AUROC interval, {int(n_valid[c])} of {draws} bootstrap draws had a "
                         f"positive and a negative (needs {need})")
    has = np.isfinite(aucs).any(axis=1)
    means = np.full(draws, np.nan)
    means[has] = np.nanmean(aucs[has], axis=1)
    mean_low, mean_high, mean_valid = percentile_interval(means, draws)
    if scored.any() and np.isnan(mean_low):
        notes.append(f"mean AUROC: no interval, {mean_valid} of {draws} bootstrap draws scored a class (needs {need})")
    settings = {
        "draws": draws, "seed": seed, "unit": unit, "units": int(groups.max()) + 1 if len(groups) else 0,
        "percentiles": list(CI_PERCENTILES), "min_valid_draws": need, "mean_rule": MEAN_RULE,
        "valid_draws": {**{n: int(v) for n, v in zip(names, n_valid)}, "mean": mean_valid},
    }
    return AurocIntervals(low, high, n_valid.astype(int), mean_low, mean_high, mean_valid, settings, notes)


# Paired differences: two or more score sets on the same images, every draw resampling the same patients for
# all of them, so the interval of a difference keeps the correlation of the two AUROCs (as DeLong's test does).
P_RULE = ("two-sided: 2 (1 + the draws on the far side of 0) / (1 + valid draws), capped at 1 "
          "(the +1 keeps a finite number of draws from claiming p = 0)")


@dataclass
class PairedIntervals:
    """Paired bootstrap of AUROC(other) - AUROC(reference): per class and for the mean (MEAN_RULE)."""

    low: np.ndarray  # (labels,) NaN where not reported
    high: np.ndarray
    p: np.ndarray  # (labels,) bootstrap p of a zero difference (P_RULE), NaN where not reported
    valid: np.ndarray  # (labels,) int: draws with a positive and a negative of the class
    mean_low: float
    mean_high: float
    mean_p: float
    mean_valid: int
    settings: dict
    notes: list[str] = field(default_factory=list)


def bootstrap_p(values: np.ndarray, draws: int) -> float:
    """P_RULE's p of a zero difference from bootstrap `values`; NaN with fewer than needed_draws finite ones."""
    ok = values[np.isfinite(values)]
    if len(ok) < needed_draws(draws):
        return float("nan")
    far = min(int((ok <= 0).sum()), int((ok >= 0).sum()))
    return min(1.0, 2 * (far + 1) / (len(ok) + 1))


def paired_auroc_differences(y, reference, others, mask=None, patient_ids=None, names=None,
                             draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> list[PairedIntervals]:
    """For each score set in `others` ((n, labels) each), the paired bootstrap of its AUROC minus that of
    `reference` on the same images: one set of patient draws (seeded) weighs every score set alike."""
    y = np.asarray(y)
    k, valid, names = y.shape[1], _mask(y, mask), _names(names, y.shape[1])
    groups, unit, notes = patient_groups(patient_ids, len(y))
    sets = [np.asarray(reference), *(np.asarray(o) for o in others)]
    # Side by side as columns of one matrix: bootstrap_auroc_draws draws each row's counts once for all columns.
    aucs = bootstrap_auroc_draws(np.tile(y, len(sets)), np.concatenate(sets, axis=1), groups,
                                 np.tile(valid, len(sets)), draws, seed)
    settings = {"draws": draws, "seed": seed, "unit": unit, "units": int(groups.max()) + 1 if len(groups) else 0,
                "percentiles": list(CI_PERCENTILES), "min_valid_draws": needed_draws(draws),
                "mean_rule": MEAN_RULE, "p_rule": P_RULE}
    out = []
    for i in range(1, len(sets)):
        diff = aucs[:, i * k:(i + 1) * k] - aucs[:, :k]
        low, high, p, n_valid = (np.full(k, np.nan) for _ in range(4))
        for c in range(k):
            low[c], high[c], n_valid[c] = percentile_interval(diff[:, c], draws)
            p[c] = bootstrap_p(diff[:, c], draws)
        has = np.isfinite(diff).any(axis=1)
        means = np.full(draws, np.nan)
        means[has] = np.nanmean(diff[has], axis=1)
        mean_low, mean_high, mean_valid = percentile_interval(means, draws)
        run_notes = list(notes) + [f"{names[c]}: no paired interval, {int(n_valid[c])} of {draws} draws had a "
                                   f"positive and a negative" for c in range(k)
                                   if np.isnan(low[c]) and n_valid[c] > 0]
        out.append(PairedIntervals(low, high, p, n_valid.astype(int), mean_low, mean_high, bootstrap_p(means, draws),
                                   mean_valid, settings, run_notes))
    return out


def paired_bootstrap(y, scores_a, scores_b, mask=None, patient_ids=None, names=None,
                     draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> PairedIntervals:
    """The paired bootstrap of AUROC(scores_a) - AUROC(scores_b) (delong_test's sign)."""
    return paired_auroc_differences(y, scores_b, [scores_a], mask, patient_ids, names, draws, seed)[0]
