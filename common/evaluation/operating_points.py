"""Operating points: per class, the threshold that reaches a target specificity (or sensitivity) on
val, and the sensitivity, specificity and PPV it gives on each scored split, with patient-level
bootstrap intervals.

A target "specificity=0.90" takes the lowest threshold whose val specificity is at least 0.90 (so
the highest val sensitivity that allows); "sensitivity=0.90" the highest threshold whose val
sensitivity is at least 0.90. An image is called positive when its probability >= threshold.
The threshold stays fixed from val: a test interval resamples test's patients (all images of a
drawn patient, as common/evaluation/bootstrap.py does for AUROC) and never re-chooses it, so it
shows how the val choice holds on new patients. PPV depends on the split's prevalence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.evaluation.bootstrap import BOOTSTRAP_SEED, bootstrap_counts, patient_groups, percentile_interval
from common.evaluation.text import UNDEFINED, entry_with_interval, number
from common.runs import rundir

METRICS = ("sensitivity", "specificity")
DEFAULT_TARGETS = ("specificity=0.90", "specificity=0.95", "sensitivity=0.90", "sensitivity=0.95")
FLAG = "--operating-point"


def add_flag(group) -> None:
    """--operating-point, as heads.train and the fine-tune job take it (parse_targets checks it)."""
    group.add_argument(FLAG, default=",".join(DEFAULT_TARGETS), metavar="METRIC=VALUE[,...]",
                       help="comma-separated targets whose thresholds are chosen on val and scored on val and test, "
                            "e.g. sensitivity=0.9 or specificity=0.9,sensitivity=0.98")


def parse_target(text: str) -> str:
    """'sensitivity=0.9' -> 'sensitivity=0.90' (the form metrics.json records); ValueError, one line, else."""
    metric, sep, value = str(text).strip().partition("=")
    metric = metric.strip().lower()
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not sep or metric not in METRICS or not 0 < v < 1:
        raise ValueError(f"{FLAG} {text!r}: write sensitivity=X or specificity=X with 0 < X < 1, e.g. "
                         "specificity=0.95")
    return f"{metric}={v:.2f}" if round(v, 2) == v else f"{metric}={v:g}"


def parse_targets(values) -> tuple[str, ...]:
    """The flag's values (repeated and/or comma-separated) as targets, in order, without repeats;
    DEFAULT_TARGETS when none is given."""
    items = [values] if isinstance(values, str) else list(values or [])
    parsed = [parse_target(part) for item in items for part in str(item).split(",") if part.strip()]
    return tuple(dict.fromkeys(parsed)) or DEFAULT_TARGETS


def _split_target(target: str) -> tuple[str, float]:
    metric, _, value = target.partition("=")
    return metric, float(value)


def threshold_for(y, probs, target: str) -> float:
    """The threshold on these (val) scores that meets `target`, as the module docstring says; NaN
    without a positive or a negative."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    pos, neg = np.sort(probs[y == 1]), np.sort(probs[y == 0])
    if not (len(pos) and len(neg)):
        return float("nan")
    # Candidates: every distinct score, and one just above the highest (nothing called positive).
    cand = np.append(np.unique(probs), np.nextafter(probs.max(), np.inf))
    sensitivity = (len(pos) - np.searchsorted(pos, cand, "left")) / len(pos)  # scores >= t
    specificity = np.searchsorted(neg, cand, "left") / len(neg)  # scores < t
    metric, value = _split_target(target)
    tol = 1e-12  # 9/10 meets 0.90 despite binary fractions
    if metric == "specificity":
        return float(cand[np.flatnonzero(specificity >= value - tol)[0]])
    return float(cand[np.flatnonzero(sensitivity >= value - tol)[-1]])


@dataclass
class OperatingPoints:
    """Thresholds chosen on one split (val), to be scored on any split of the same labels."""

    targets: tuple[str, ...]
    thresholds: np.ndarray  # (targets, classes), NaN where the class could not be chosen
    chosen_on: str = "val"
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What a split's metrics.json keeps about the choice."""
        return {"chosen_on": self.chosen_on, "targets": list(self.targets)}


def choose(y, probs, mask, names, targets=DEFAULT_TARGETS, chosen_on: str = "val") -> OperatingPoints:
    """Per target and class, the threshold on the scored entries of this (val) split."""
    y, probs = np.asarray(y), np.asarray(probs)
    valid = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
    out = np.full((len(targets), y.shape[1]), np.nan)
    notes = []
    for c, name in enumerate(names):
        keep = valid[:, c]
        out[:, c] = [threshold_for(y[keep, c], probs[keep, c], t) for t in targets]
        if np.isnan(out[:, c]).all() and len(targets):
            notes.append(f"thresholds: {name}: no positive or no negative on {chosen_on}, no operating point chosen")
    return OperatingPoints(tuple(targets), out, chosen_on, notes)


def from_run(run_dir, names, targets=DEFAULT_TARGETS) -> tuple[OperatingPoints | None, list[str]]:
    """Thresholds chosen on another run's val predictions (heads.evaluate: the head's own val, never the
    store being scored); None and a note when that run kept no predictions/val.parquet."""
    path = Path(run_dir) / rundir.PREDICTIONS / "val.parquet"
    if not path.is_file():
        return None, [f"operating points: none, they are chosen on the head run's val and {path} is not there"]
    val = rundir.read_predictions(path, names)
    points = choose(val["y"], val["probs"], val["mask"], names, targets, chosen_on="the head run's val")
    return points, points.notes


def _unit_counts(y, probs, valid, groups, n_units, points: OperatingPoints) -> np.ndarray:
    """(units, classes, 2 + 2 * targets) counts per resampling unit: a class's positives and negatives,
    then per target its true positives, then per target its true negatives. float32: exact for counts
    below 2**24, and twice as fast to resample as float64."""
    k, m = y.shape[1], len(points.targets)
    out = np.zeros((n_units, k, 2 + 2 * m), dtype=np.float32)
    for c in range(k):
        pos, neg = valid[:, c] & (y[:, c] == 1), valid[:, c] & (y[:, c] == 0)
        out[:, c, 0] = np.bincount(groups[pos], minlength=n_units)
        out[:, c, 1] = np.bincount(groups[neg], minlength=n_units)
        for j in np.flatnonzero(np.isfinite(points.thresholds[:, c])):
            called = probs[:, c] >= points.thresholds[j, c]
            out[:, c, 2 + j] = np.bincount(groups[pos & called], minlength=n_units)
            out[:, c, 2 + m + j] = np.bincount(groups[neg & ~called], minlength=n_units)
    return out


def _rates(counts: np.ndarray, m: int, chosen: np.ndarray) -> np.ndarray:
    """(..., classes, 2 + 2m) counts -> (..., classes, m, 3) sensitivity, specificity, PPV; NaN where
    undefined or where no threshold was `chosen` (classes, m)."""
    pos, neg = counts[..., :1].astype(np.float64), counts[..., 1:2].astype(np.float64)
    tp, tn = counts[..., 2:2 + m], counts[..., 2 + m:]
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.stack([tp / pos, tn / neg, tp / (tp + neg - tn)], axis=-1)
    rates[..., ~chosen, :] = np.nan
    return rates


def score(y, probs, mask, names, points: OperatingPoints, patient_ids=None, draws: int = 0,
          seed: int = BOOTSTRAP_SEED) -> dict[str, list[dict]]:
    """Per class, one entry per target: the val threshold, and sensitivity, specificity and PPV on this
    split, with 95% percentile intervals from `draws` patient-level resamples (none when 0); NaN where
    undefined (no threshold chosen, no positive, nothing called positive for PPV)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    valid = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
    groups = patient_groups(patient_ids, len(y))[0]  # its notes: the AUROC intervals' already say them
    n_units = int(groups.max()) + 1 if len(groups) else 0
    k, m = y.shape[1], len(points.targets)
    per_unit = _unit_counts(y, probs, valid, groups, n_units, points)
    chosen = np.isfinite(points.thresholds).T  # (k, m)
    point = _rates(per_unit.sum(axis=0, dtype=np.float64), m, chosen)  # (k, m, 3)
    low, high = np.full((2, k, m, 3), np.nan)
    if draws and n_units:
        flat = per_unit.reshape(n_units, -1)
        resampled = np.concatenate([_rates((counts.astype(np.float32) @ flat).reshape(len(counts), k, -1), m, chosen)
                                    for counts in bootstrap_counts(n_units, draws, np.random.default_rng(seed))])
        bounds = np.apply_along_axis(lambda v: percentile_interval(v, draws)[:2], 0, resampled)  # (2, k, m, 3)
        low, high = bounds
    out = {}
    for c, name in enumerate(names):
        out[name] = []
        for j, target in enumerate(points.targets):
            t = points.thresholds[j, c]
            entry = {"target": target, "threshold": float(t)}  # NaN (null in metrics.json): none chosen
            for i, metric in enumerate(("sensitivity", "specificity", "ppv")):
                entry[metric] = float(point[c, j, i])
                entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"] = float(low[c, j, i]), float(high[c, j, i])
            out[name].append(entry)
    return out


def report_lines(metrics: dict) -> list[str]:
    """report.md's "Operating points" section: a row per class and target, a column per split."""
    names, splits = metrics["label_names"], metrics["splits"]
    scored = [s for s, m in splits.items() if "operating_points" in m]
    if not scored:
        return []  # a run from before operating points were reported
    chosen_on = splits[scored[0]]["operating_points"]["chosen_on"]
    header = ["label", "target", f"threshold ({chosen_on})"]
    for s in scored:
        header += [f"{s} sensitivity", f"{s} specificity", f"{s} PPV"]
    rows = []
    for name in names:
        entries = [splits[s]["per_class"][name].get("operating_points", []) for s in scored]
        for j, first in enumerate(entries[0]):
            row = [name, first["target"], number(first["threshold"])]
            for e in entries:
                row += [entry_with_interval(e[j], "sensitivity"), entry_with_interval(e[j], "specificity"),
                        entry_with_interval(e[j], "ppv")]
            rows.append(row)
    lines = ["", "## Operating points", "",
             f"Each threshold is chosen on {chosen_on} to reach its target there (specificity=X: the lowest threshold "
             "with at least that specificity; sensitivity=X: the highest with at least that sensitivity), then "
             "held fixed; an image is called positive at probability >= threshold. Intervals: 95% percentile, "
             "patient-level bootstrap with the threshold fixed. PPV depends on the split's prevalence. "
             f"{UNDEFINED}: the class had no positive or no negative where it was chosen or scored.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
