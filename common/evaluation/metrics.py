"""Multi-label evaluation: per-class AUROC, AUPRC (average precision) with its prevalence baseline,
mean AUC, W-AUC, D-AUC, N-AUC, and accuracy / precision / recall / F1 at 0.5 and at per-class
thresholds chosen on validation.

Arrays are (n, labels): `y` 0/1 targets, `scores` probabilities (or any monotone score),
`mask` True where the label counts (False: uncertain under U-Ignore). A class whose AUROC is
undefined (no positives or no negatives among the images it is computed on) gets NaN and a
note; nothing raises.

D-AUC and N-AUC follow Ge et al. 2018 ("Chest X-rays classification: a multi-label and
fine-grained problem"): for class c, positives are the c-positive images in both; negatives are
c-negative images that have another disease (D-AUC) or no disease at all, "No Finding" (N-AUC).

AUROC intervals come from common/evaluation/bootstrap.py (patient-level resampling).
"""

from __future__ import annotations


import numpy as np
from scipy.stats import rankdata
import pandas as pd
from sklearn.metrics import (accuracy_score, average_precision_score, precision_recall_curve,
                             precision_recall_fscore_support, roc_auc_score)

from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, bootstrap_auroc


def _mask(y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.ones(y.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def _names(names, k: int) -> list[str]:
    return list(names) if names is not None else [str(i) for i in range(k)]


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    # Undefined, as AUROC, without both classes: with no negatives it would be a trivial 1.
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(average_precision_score(y, s))


def _aucs(y, scores, valid, names, what: str, negatives: str, area=_auc) -> tuple[np.ndarray, list[str]]:
    out, notes = np.full(y.shape[1], np.nan), []
    for c in range(y.shape[1]):
        keep = valid[:, c]
        yc = y[keep, c]
        out[c] = area(yc, scores[keep, c])
        if np.isnan(out[c]):
            missing = "positives" if not (yc == 1).any() else negatives
            notes.append(f"{names[c]}: no {missing}, {what} is NaN")
    return out, notes


def per_class_auroc(y, scores, mask=None, names=None) -> tuple[np.ndarray, list[str]]:
    """AUROC per class over its valid entries (scikit-learn's roc_auc_score)."""
    valid = _mask(y, mask)
    return _aucs(y, scores, valid, _names(names, y.shape[1]), "AUROC", "negatives")


def per_class_auprc(y, scores, mask=None, names=None) -> tuple[np.ndarray, list[str]]:
    """Area under the precision-recall curve per class over its valid entries, as scikit-learn's
    average_precision_score (a step sum, no interpolation); a random ranking scores the prevalence."""
    valid = _mask(y, mask)
    return _aucs(y, scores, valid, _names(names, y.shape[1]), "AUPRC", "negatives", _average_precision)


def prevalence(y, mask=None) -> np.ndarray:
    """(labels,) positives / scored entries per class: the AUPRC of a random ranking; NaN where none is scored."""
    valid = _mask(y, mask)
    scored = valid.sum(axis=0)
    out = np.full(y.shape[1], np.nan)
    np.divide(((y == 1) & valid).sum(axis=0), scored, out=out, where=scored > 0)
    return out


def fast_auroc(y, scores, mask=None) -> np.ndarray:
    """Per-class AUROC as the Mann-Whitney U of average ranks (ties count half): the same value as
    roc_auc_score without its input checks, which cost ~4x the computation; for the per-epoch
    progress line. NaN where a class lacks positives or negatives."""
    valid = _mask(y, mask)
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        yc, sc = y[valid[:, c], c] == 1, scores[valid[:, c], c]
        n_pos = int(yc.sum())
        n_neg = len(yc) - n_pos
        if n_pos and n_neg:
            out[c] = (rankdata(sc)[yc].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def weighted_auc(aucs: np.ndarray, y: np.ndarray, mask=None) -> float:
    """W-AUC: per-class AUROC averaged with weights = positives of each class in this split
    (classes with NaN AUROC are left out)."""
    positives = ((y == 1) & _mask(y, mask)).sum(axis=0).astype(float)
    ok = ~np.isnan(aucs) & (positives > 0)
    return float(np.average(aucs[ok], weights=positives[ok])) if ok.any() else float("nan")


def d_auc(y, scores, mask=None, has_disease=None, names=None) -> tuple[np.ndarray, list[str]]:
    """D-AUC per class: c-positive images vs c-negative images with at least one other disease.

    `has_disease` (n,) says whether an image has any positive disease label; default: any
    positive among the columns of `y`. With y[:, c] == 0, that positive is another class."""
    valid = _mask(y, mask)
    if has_disease is None:
        has_disease = ((y == 1) & valid).any(axis=1)
    keep = valid & ((y == 1) | has_disease[:, None])
    return _aucs(y, scores, keep, _names(names, y.shape[1]), "D-AUC", "negatives with another disease")


def n_auc(y, scores, mask=None, no_finding=None, names=None) -> tuple[np.ndarray, list[str]]:
    """N-AUC per class: c-positive images vs "No Finding" images (every disease label negative).

    `no_finding` (n,) marks those images; default: all columns of `y` valid and 0."""
    valid = _mask(y, mask)
    if no_finding is None:
        no_finding = ((y == 0) & valid).all(axis=1)
    keep = valid & ((y == 1) | no_finding[:, None])
    return _aucs(y, scores, keep, _names(names, y.shape[1]), "N-AUC", "No Finding images")


def choose_thresholds(y, scores, mask=None, names=None) -> tuple[np.ndarray, list[str]]:
    """Per-class threshold maximizing F1 on this (validation) split; 0.5 where undefined."""
    valid, names = _mask(y, mask), _names(names, y.shape[1])
    out, notes = np.full(y.shape[1], 0.5), []
    for c in range(y.shape[1]):
        yc, sc = y[valid[:, c], c], scores[valid[:, c], c]
        if not (yc == 1).any():
            notes.append(f"{names[c]}: no positives to choose a threshold on; 0.5 used")
            continue
        precision, recall, thresholds = precision_recall_curve(yc, sc)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        out[c] = float(thresholds[int(np.argmax(f1))])
    return out, notes


def at_thresholds(y, scores, thresholds, mask=None) -> dict[str, np.ndarray]:
    """Accuracy, precision, recall, F1 per class of `scores >= threshold` (NaN where undefined)."""
    valid = _mask(y, mask)
    k = y.shape[1]
    out = {m: np.full(k, np.nan) for m in ("accuracy", "precision", "recall", "f1")}
    for c in range(k):
        yc = y[valid[:, c], c].astype(int)
        if yc.size == 0:
            continue
        pred = (scores[valid[:, c], c] >= thresholds[c]).astype(int)
        out["accuracy"][c] = accuracy_score(yc, pred)
        p, r, f, _ = precision_recall_fscore_support(yc, pred, average="binary", zero_division=np.nan)
        out["precision"][c], out["recall"][c], out["f1"][c] = p, r, f
    return out


def nanmean(a: np.ndarray) -> float:
    """Mean of the finite entries (e.g. per-class AUROCs); NaN, without a warning, when there are none."""
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def study_level(study_ids, y, scores, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image rows -> one row per study (CheXpert's study-level evaluation): the study's highest
    probability per class, and its label, the certain label its images share. A class whose images
    disagree (a 1 and a 0) is left out for that study; the count of such cases is returned too."""
    y, scores = np.asarray(y), np.asarray(scores, dtype=np.float64)
    valid = _mask(y, mask)
    codes, uniques = pd.factorize(np.asarray(study_ids, dtype=object))
    n, k = len(uniques), y.shape[1]
    best = np.full((n, k), -np.inf)
    np.maximum.at(best, codes, scores)
    pos, neg = np.zeros((n, k), int), np.zeros((n, k), int)
    np.add.at(pos, codes, (y == 1) & valid)
    np.add.at(neg, codes, (y == 0) & valid)
    has_pos, has_neg = pos > 0, neg > 0
    return (has_pos.astype(np.float32), best, has_pos ^ has_neg, int((has_pos & has_neg).sum()))


def evaluate(y, scores, mask=None, names=None, has_disease=None, no_finding=None,
             thresholds: np.ndarray | None = None, patient_ids=None, bootstrap_draws: int = BOOTSTRAP_DRAWS,
             bootstrap_seed: int = BOOTSTRAP_SEED) -> dict:
    """Every metric of one split, as plain Python values (NaN for undefined ones) and notes; with
    bootstrap_draws > 0, AUROC intervals by patient (`patient_ids`, (n,)) under "bootstrap"."""
    y = np.asarray(y)
    valid = _mask(y, mask)
    names = _names(names, y.shape[1])
    auc, n1 = per_class_auroc(y, scores, valid, names)
    auprc, n4 = per_class_auprc(y, scores, valid, names)
    base = prevalence(y, valid)
    dauc, n2 = d_auc(y, scores, valid, has_disease, names)
    nauc, n3 = n_auc(y, scores, valid, no_finding, names)
    half = at_thresholds(y, scores, np.full(y.shape[1], 0.5), valid)
    tuned = at_thresholds(y, scores, thresholds, valid) if thresholds is not None else None
    ci = bootstrap_auroc(y, scores, valid, patient_ids, names, bootstrap_draws, bootstrap_seed) if bootstrap_draws else None
    per_class = {}
    for c, name in enumerate(names):
        entry = {
            "n_pos": int(((y[:, c] == 1) & valid[:, c]).sum()),
            "n_neg": int(((y[:, c] == 0) & valid[:, c]).sum()),
            "auroc": auc[c], "auprc": auprc[c], "prevalence": base[c], "d_auc": dauc[c], "n_auc": nauc[c],
            "at_0.5": {m: v[c] for m, v in half.items()},
        }
        if ci is not None:
            entry["auroc_ci_low"], entry["auroc_ci_high"] = ci.low[c], ci.high[c]
        if tuned is not None:
            entry["at_val_threshold"] = {"threshold": float(thresholds[c]), **{m: v[c] for m, v in tuned.items()}}
        per_class[name] = entry
    summary = {
        "mean_auc": nanmean(auc),
        "mean_auprc": nanmean(auprc),
        "w_auc": weighted_auc(auc, y, valid),
        "mean_d_auc": nanmean(dauc),
        "mean_n_auc": nanmean(nauc),
        "macro_f1_at_0.5": nanmean(half["f1"]),
    }
    if tuned is not None:
        summary["macro_f1_at_val_threshold"] = nanmean(tuned["f1"])
    result = {"n": int(len(y)), "summary": summary, "per_class": per_class, "notes": n1 + n4 + n2 + n3}
    if ci is not None:
        summary["mean_auc_ci_low"], summary["mean_auc_ci_high"] = ci.mean_low, ci.mean_high
        result["bootstrap"] = ci.settings
        result["notes"] += ci.notes
    return result
