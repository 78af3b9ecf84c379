"""Every AUROC by who the images are: sex, age band, view and source, with counts and intervals.

A predictions file carries each image's patient_id, sex, age, view and source (common/runs/rundir.py
GROUP_COLUMNS); here they become groups, each scored on its own images:

- a class is scored in a group only with at least MIN_POSITIVES positives and MIN_NEGATIVES negatives
  there: below that an AUROC and its percentile interval swing on one or two images, so the group shows
  its counts and why, never a number;
- a group's mean AUROC is over the classes it scores (their number is recorded: two groups' means may
  be over different classes), its interval from the split's bootstrap (draws, seed, MEAN_RULE) resampling
  the group's own patients;
- an unknown value (no sex, no age, no view) puts the image in the group "unknown", shown with its count
  and never part of a gap;
- an attribute whose images all share one known value is the whole split: not scored again;
- a class's largest gap is the widest AUROC difference between two scored groups of one attribute.
Computed once per run, after training (common/evaluation/scores.score_splits).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.evaluation.age_bands import AGE_BANDS, UNKNOWN, age_bands, band_names
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, bootstrap_auroc
from common.evaluation.metrics import nanmean, per_class_auroc
from common.evaluation.text import UNDEFINED, entry_with_interval, number
from common.runs.rundir import GROUP_COLUMNS

ATTRIBUTES = GROUP_COLUMNS  # sex, age (banded here), view, source
MIN_POSITIVES = 10
MIN_NEGATIVES = 10
SEXES = {1: "M", 0: "F"}  # the stores' and tables' codes (common/data/tables.py)
LOCAL_DATASETS = ("table", "dicom")  # a local collection: its dataset name alone does not say which
WHOLE_SPLIT = "every image of the split: its metrics are the split's own"


def decode_sex(sex) -> np.ndarray:
    """The stores' float codes (1 male, 0 female, NaN unknown; a table's Int8 with <NA> alike) -> "M", "F", None."""
    codes = pd.to_numeric(pd.Series(np.asarray(sex, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
    out = np.full(len(codes), None, dtype=object)
    for code, name in SEXES.items():
        out[codes == code] = name
    return out


def source_name(dataset, flags: dict | None = None) -> str:
    """Where images came from: the dataset, and for a local collection the table (or folder) named by the
    `flags` that read it (a store manifest's "config", a fine-tune's settings)."""
    where = (flags or {}).get("metadata") or (flags or {}).get("images")
    return f"{dataset}:{Path(str(where)).name}" if dataset in LOCAL_DATASETS and where else str(dataset)


def image_groups(n: int, sex=None, age=None, view=None, source=None) -> dict[str, np.ndarray]:
    """A split's GROUP_COLUMNS as a predictions file holds them: sex decoded ("M"/"F"/None), age in years
    (NaN unknown), view (None unknown), source (one name for every row, or one per row)."""
    def text(values) -> np.ndarray:
        if values is None or isinstance(values, str):
            return np.full(n, values, dtype=object)
        out = np.asarray(values, dtype=object).copy()
        out[pd.isna(out) | (out == "")] = None
        return out

    return {"sex": decode_sex(sex) if sex is not None else np.full(n, None, dtype=object),
            "age": np.asarray(age, dtype=np.float64) if age is not None else np.full(n, np.nan),
            "view": text(view), "source": text(source)}


def _labels(attribute: str, values, edges) -> tuple[np.ndarray, list[str]]:
    """(n,) group name per image and the groups in report order (an empty age band kept: no children is a finding)."""
    if attribute == "age":
        labels = age_bands(values, edges)
        order = band_names(edges)
    else:
        labels = np.asarray(values, dtype=object).copy()
        labels[pd.isna(labels)] = UNKNOWN
        labels = labels.astype(str).astype(object)
        counts = pd.Series(labels[labels != UNKNOWN]).value_counts()
        order = ["F", "M"] if attribute == "sex" else sorted(counts.index, key=lambda g: (-counts[g], g))
    return labels, order + ([UNKNOWN] if (labels == UNKNOWN).any() else [])


def _too_small(n_pos: int, n_neg: int) -> str:
    return f"{n_pos} positives, {n_neg} negatives (needs {MIN_POSITIVES} and {MIN_NEGATIVES})"


def _group(y, probs, mask, names, patient_ids, draws: int, seed: int) -> dict:
    """One group's images: per-class AUROC and interval where it has enough of both, the mean over those."""
    n_pos = ((y == 1) & mask).sum(axis=0)
    n_neg = ((y == 0) & mask).sum(axis=0)
    ok = (n_pos >= MIN_POSITIVES) & (n_neg >= MIN_NEGATIVES)
    scored_mask = mask & ok[None, :]
    auc, _ = per_class_auroc(y, probs, scored_mask, names)  # notes: the unscored classes, said per class below
    ci = bootstrap_auroc(y, probs, scored_mask, patient_ids, names, draws, seed) if draws and ok.any() else None
    per_class = {}
    for c, name in enumerate(names):
        entry = {"auroc": float(auc[c]) if ok[c] else None, "n_pos": int(n_pos[c]), "n_neg": int(n_neg[c]),
                 "auroc_ci_low": float(ci.low[c]) if ci is not None and ok[c] else None,
                 "auroc_ci_high": float(ci.high[c]) if ci is not None and ok[c] else None}
        if not ok[c]:
            entry["why"] = _too_small(int(n_pos[c]), int(n_neg[c]))
        per_class[name] = entry
    out = {"n": int(len(y)), "positives": int(((y == 1) & mask).any(axis=1).sum()), "scored": bool(ok.any()),
           "classes_scored": int(ok.sum()), "mean_auc": nanmean(auc[ok]) if ok.any() else None,
           "mean_auc_ci_low": ci.mean_low if ci is not None else None,
           "mean_auc_ci_high": ci.mean_high if ci is not None else None, "per_class": per_class}
    if not ok.any():
        most = int(n_pos.max()) if len(n_pos) else 0
        out["why"] = (f"no class has {MIN_POSITIVES} positives and {MIN_NEGATIVES} negatives "
                      f"(most positives of a class: {most})")
    return out


def subgroup_metrics(y, probs, mask, names, groups: dict, patient_ids=None, edges=AGE_BANDS,
                     draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """{attribute: {group: {...}}, "largest_gaps": {...}} of one split (metrics.json's "subgroups")."""
    y, probs = np.asarray(y), np.asarray(probs)
    mask = np.ones(y.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    pids = None if patient_ids is None else np.asarray(patient_ids, dtype=object)
    out = {}
    for attribute in ATTRIBUTES:
        labels, order = _labels(attribute, groups[attribute], edges)
        present = [g for g in order if (labels == g).any()]
        out[attribute] = {}
        for g in order:
            rows = labels == g
            if not rows.any():
                out[attribute][g] = {"n": 0, "scored": False, "why": "no images"}
            elif present == [g]:  # one group, the whole split: nothing to compare, nothing new to score
                out[attribute][g] = {"n": int(rows.sum()), "scored": False,
                                     "why": WHOLE_SPLIT if g != UNKNOWN else f"no image has a known {attribute}"}
            else:
                out[attribute][g] = _group(y[rows], probs[rows], mask[rows], names,
                                           None if pids is None else pids[rows], draws, seed)
    out["largest_gaps"] = largest_gaps(out, names)
    return out


def largest_gaps(subgroups: dict, names) -> dict:
    """Per class, the widest AUROC difference between two scored known groups of one attribute: the
    attribute, [higher, lower] group, their AUROCs, the gap, and whether their intervals overlap (None
    without intervals). A class no attribute scores in two groups has no entry."""
    gaps = {}
    for name in names:
        best = None
        for attribute in ATTRIBUTES:
            scored = [(e["per_class"][name], g) for g, e in subgroups.get(attribute, {}).items()
                      if g != UNKNOWN and e.get("per_class", {}).get(name, {}).get("auroc") is not None]
            if len(scored) < 2:
                continue
            (high, g_high), (low, g_low) = (f(scored, key=lambda s: s[0]["auroc"]) for f in (max, min))
            gap = high["auroc"] - low["auroc"]
            if best is None or gap > best["gap"]:
                bounds = [high["auroc_ci_low"], low["auroc_ci_high"]]
                best = {"attribute": attribute, "groups": [g_high, g_low], "aurocs": [high["auroc"], low["auroc"]],
                        "gap": gap, "intervals_overlap": None if None in bounds or any(map(math.isnan, bounds))
                        else bool(bounds[0] <= bounds[1])}
        if best is not None:
            gaps[name] = best
    return gaps


# --- report ---------------------------------------------------------------------------------------

RULE = (f"Each group is scored on its own images. A class is scored in a group only with at least {MIN_POSITIVES} "
        f"positives and {MIN_NEGATIVES} negatives there (fewer: its counts, never a number); a group's mean AUROC is "
        "over the classes it scores; intervals: the split's bootstrap, resampling the group's own patients. "
        "Age bands hold [low, high) years; \"unknown\" is an image without that attribute.")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def _class_cell(e: dict) -> str:
    """A class's AUROC in a group, or its counts where it is too small to score there."""
    if e["auroc"] is None:
        return f"{UNDEFINED} ({e['n_pos']} pos / {e['n_neg']} neg)"
    return entry_with_interval(e, "auroc")


def _one_cell(e: dict, text: str) -> str:
    """A binary task's AUROC in a group, or its counts where it is too small to score there."""
    return _class_cell(e["per_class"][next(iter(e["per_class"]))]) if e.get("per_class") and not e["scored"] else text


def _attribute_lines(attribute: str, groups: dict, names: list[str]) -> list[str]:
    """One attribute's groups (counts, mean AUROC or why not) and, where two or more are scored, AUROC per class."""
    lines = ["", f"### By {attribute}", ""]
    present = [g for g, e in groups.items() if e["n"]]
    if len(present) == 1 and not groups[present[0]]["scored"] and "per_class" not in groups[present[0]]:
        g, n = present[0], groups[present[0]]["n"]
        return lines + [f"No image of the split has a known {attribute} ({n} images)." if g == UNKNOWN
                        else f"All {n} images are `{g}`: the split's own metrics are theirs."]
    rows = []
    for g, e in groups.items():
        mean = entry_with_interval(e, "mean_auc") if e["scored"] else f"too small: {e['why']}" if e["n"] else e["why"]
        scored = f"{e['classes_scored']} of {len(names)}" if "classes_scored" in e else UNDEFINED
        rows.append([g, str(e["n"]), number(e.get("positives")), scored, mean])
    if len(names) == 1:  # one label: its AUROC per group is the table, with no per-class repeat of it
        return lines + _table(["group", "images", "positives", f"{names[0]} AUROC (95% CI)"],
                              [[g, n, pos, _one_cell(groups[g], mean)] for g, n, pos, _, mean in rows])
    lines += _table(["group", "images", "with a finding", "classes scored", "mean AUROC (95% CI)"], rows)
    shown = [g for g, e in groups.items() if e.get("per_class")]
    if sum(groups[g]["scored"] for g in shown) >= 2:
        cells = [[n] + [_class_cell(groups[g]["per_class"][n]) for g in shown] for n in names]
        lines += ["", *_table(["class", *shown], cells)]
    return lines


def _gap_lines(gaps: dict) -> list[str]:
    lines = ["", "### Largest gap per class", ""]
    if not gaps:
        return lines + ["No class is scored in two groups of one attribute."]
    lines += ["The widest AUROC difference between two scored groups of one attribute (\"unknown\" left out). "
              "Where the two intervals overlap, the gap is within the bootstrap's spread.", ""]
    overlap = {True: "yes", False: "**no**", None: "—"}
    rows = [[n, g["attribute"], *[f"{group} {number(auroc)}" for group, auroc in zip(g["groups"], g["aurocs"])],
             number(g["gap"]), overlap[g["intervals_overlap"]]] for n, g in gaps.items()]
    return lines + _table(["class", "attribute", "higher", "lower", "gap", "intervals overlap"], rows)


def report_lines(metrics: dict) -> list[str]:
    """The report's "Subgroups" section for the test split (else the first split that has subgroups);
    nothing for a run without them (its notes say why)."""
    splits = {s: m["subgroups"] for s, m in metrics["splits"].items() if m.get("subgroups")}
    if not splits:
        return []
    split = "test" if "test" in splits else next(iter(splits))
    sub, names = splits[split], list(metrics["label_names"])
    rule = RULE if len(names) != 1 else RULE.replace("; a group's mean AUROC is over the classes it scores", "")
    lines = ["", f"## Subgroups ({split} split)", "", rule]
    for attribute in ATTRIBUTES:
        if attribute in sub:
            lines += _attribute_lines(attribute, sub[attribute], names)
    return lines + _gap_lines(sub.get("largest_gaps", {}))
