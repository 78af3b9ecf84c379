"""Runs side by side: per-class and mean AUROC with their bootstrap intervals, the settings
that differ between the runs (LeDNet's original vs lung-masked vs fused comparison, one policy
against another, a head against a fine-tune), and each run paired against a reference run: the
AUROC difference per class with DeLong's test, and a paired patient-level bootstrap interval of
each class's and the mean's difference.

Only runs scored on the same images with the same ground truth are compared: a table whose
columns were measured on different test sets would compare the sets, not the models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from common import atomic
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, paired_auroc_differences, patient_groups
from common.evaluation.delong import delong_per_class, delong_test, holm
from common.evaluation.text import UNDEFINED
from common.runs import rundir

COMPARED_KINDS = ("head", "finetune", "evaluation", "ensemble")
TABLE_MD, TABLE_CSV, PAIRED_CSV = "comparison.md", "comparison.csv", "comparison_paired.csv"
# Settings that say where a run wrote or how loudly, not what it learned.
NOT_SETTINGS = {"out", "overwrite", "quiet", "threads", "config", "log_seconds", "progress_interval"}
# Settings that say how a trained model was scored, not what it learned: runs that differ only in these (and the
# policy) differ in policy alone.
SCORING_SETTINGS = {"bootstrap_draws", "calibrate", "operating_point", "age_bands"}
PATIENT_COLUMN = "patient_id"


class CompareError(ValueError):
    """Runs that cannot be compared; the message names the run and what differs."""


@dataclass
class Run:
    name: str
    path: Path
    kind: str
    config: dict
    metrics: dict
    truth: pd.DataFrame  # image_id + the label:<name> targets (-1: not scored) of the split, sorted by image_id
    probs: np.ndarray  # (images, labels) the run's probabilities, in truth's row order
    patient_id: np.ndarray | None  # (images,) from the predictions file, None where it has no patient_id column

    @property
    def label_names(self) -> list[str]:
        return list(self.metrics["label_names"])


def load_run(path: str | os.PathLike, split: str, name: str | None = None) -> Run:
    """A head or fine-tune run directory and its `split`'s scored images, or a one-line CompareError."""
    path = Path(path)
    marker = rundir.read_marker(path)
    if marker is None:
        raise CompareError(f"{path}: not a run directory of this project (no {rundir.MARKER})")
    if marker.get("kind") not in COMPARED_KINDS:
        raise CompareError(f"{path}: a {marker.get('kind')} run; compare takes {' and '.join(COMPARED_KINDS)} runs")
    metrics_file = path / rundir.METRICS
    if not metrics_file.is_file():
        raise CompareError(f"{path}: no {rundir.METRICS}; the run has not finished")
    metrics = rundir.read_json(metrics_file)
    if split not in metrics.get("splits", {}):
        raise CompareError(f"{path}: no {split} split in {rundir.METRICS} (it has {', '.join(metrics.get('splits', {})) or 'none'})")
    predictions = path / rundir.PREDICTIONS / f"{split}.parquet"
    if not predictions.is_file():
        raise CompareError(f"{predictions}: not found; the {split} predictions say which images were scored")
    names = list(metrics["label_names"])
    columns = ["image_id", *(rundir.TARGET_PREFIX + n for n in names)]
    try:
        patients = [PATIENT_COLUMN] if PATIENT_COLUMN in pq.read_schema(predictions).names else []
        table = pq.read_table(predictions, columns=[*columns, *names, *patients]).to_pandas()
    except Exception as exc:  # a foreign or damaged file: name it
        raise CompareError(f"{predictions}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
    probs = table[names].to_numpy(dtype=np.float64)
    if not np.isfinite(probs[table[columns[1:]].to_numpy() >= 0]).all():
        raise CompareError(f"{predictions}: non-finite probabilities of scored images; the run's scores are unusable")
    return Run(name or path.name, path, marker["kind"], rundir.read_json(path / rundir.CONFIG), metrics,
               table[columns], probs, table[PATIENT_COLUMN].to_numpy(dtype=object) if patients else None)


def check_comparable(runs: list[Run], split: str) -> None:
    """Refuse runs with other labels, other images or other ground truth than the first run."""
    if len(runs) < 2:
        raise CompareError("compare needs at least two runs")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise CompareError(f"run names repeat ({', '.join(names)}); give --names")
    first = runs[0]
    for run in runs[1:]:
        if run.label_names != first.label_names:
            raise CompareError(f"{run.path}: labels {', '.join(run.label_names)} differ from {first.path}'s "
                               f"({', '.join(first.label_names)}); compare runs of one label set")
        ids, first_ids = set(run.truth["image_id"]), set(first.truth["image_id"])
        if ids != first_ids:
            raise CompareError(f"{run.path}: scored on other {split} images than {first.path} ({len(ids)} vs "
                               f"{len(first_ids)} images, {len(ids ^ first_ids)} not in both); compare runs of one "
                               "split of one table")
        if not run.truth.equals(first.truth):
            diff = [c for c in run.truth.columns[1:] if not run.truth[c].equals(first.truth[c])]
            raise CompareError(f"{run.path}: the same {split} images with other ground truth than {first.path} "
                               f"({', '.join(c.removeprefix(rundir.TARGET_PREFIX) for c in diff)})")


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(obj, sort_keys=True) if isinstance(obj, list) else obj}


def run_settings(run: Run) -> dict:
    """What made a run, flat: its features (the stores' backbone, weights and view, or the fine-tuned
    weights) and its settings, without where it wrote or how loudly."""
    config = run.config
    settings = {k: v for k, v in config.get("settings", {}).items() if k not in NOT_SETTINGS and k != "store"}
    # An evaluation of a head records the stores (or, on images, the head's stores) as a head run does.
    if run.kind == "head" or (run.kind == "evaluation" and config.get("stores")):
        features = " + ".join(f"{s.get('backbone')} {s.get('weights')} {s.get('view', 'original')}"
                              for s in config.get("stores", []))
    else:
        features = f"{config.get('settings', {}).get('backbone')} fine-tuned from {config.get('weights', {}).get('label')}"
    return {"kind": run.kind, "features": features, **_flatten(settings)}


def differing_settings(runs: list[Run]) -> dict[str, list]:
    """Setting -> its value per run, for the settings whose values are not all the same."""
    per_run = [run_settings(r) for r in runs]
    keys = sorted({k for s in per_run for k in s}, key=lambda k: (k not in ("kind", "features"), k))
    return {k: [s.get(k) for s in per_run] for k in keys if len({json.dumps(s.get(k), default=str) for s in per_run}) > 1}


def comparison_frame(runs: list[Run], split: str) -> pd.DataFrame:
    """One row per run and class (and `mean`): AUROC, its interval, the class's positives and negatives."""
    rows = []
    for run in runs:
        m = run.metrics["splits"][split]
        for name in run.label_names:
            entry = m["per_class"][name]
            rows.append({"run": run.name, "class": name, "auroc": entry.get("auroc"),
                         "ci_low": entry.get("auroc_ci_low"), "ci_high": entry.get("auroc_ci_high"),
                         "n_pos": entry.get("n_pos"), "n_neg": entry.get("n_neg")})
        s = m["summary"]
        rows.append({"run": run.name, "class": "mean", "auroc": s.get("mean_auc"), "ci_low": s.get("mean_auc_ci_low"),
                     "ci_high": s.get("mean_auc_ci_high"), "n_pos": None, "n_neg": None})
    frame = pd.DataFrame(rows)
    frame["auroc"] = frame["auroc"].astype(float)
    frame[["n_pos", "n_neg"]] = frame[["n_pos", "n_neg"]].astype("Int64")  # counts stay integers beside the mean's blank
    return frame


def reference_run(runs: list[Run], reference: str | None) -> Run:
    """The run the others are paired against: the one named `reference`, else the first."""
    if reference is None:
        return runs[0]
    for run in runs:
        if run.name == reference:
            return run
    raise CompareError(f"--reference {reference}: not one of the runs ({', '.join(r.name for r in runs)})")


@dataclass
class Paired:
    """Each run against the reference on the same images: one row per run, class and `mean`."""

    reference: str
    frame: pd.DataFrame  # run, reference, class, counts, both AUROCs, difference, DeLong, Holm, bootstrap
    n_images: int
    n_patients: int | None  # None: no patient ids, the bootstrap resampled images
    draws: int
    seed: int
    tests: int  # per-class DeLong tests with a p, the family Holm adjusts over
    notes: list[str]


def _truth(run: Run) -> tuple[np.ndarray, np.ndarray]:
    raw = run.truth[[rundir.TARGET_PREFIX + n for n in run.label_names]].to_numpy()
    return (raw == 1).astype(np.int8), raw >= 0


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)  # NumPy scalars too


def _pair_rows(run: Run, ref: Run, y, mask, boot) -> list[dict]:
    """The rows of one run against the reference: per class DeLong (+ bootstrap), then the mean (bootstrap)."""
    def bootstrap(c=None, test=None) -> dict:
        # A class with one positive (or negative) has no spread to resample on that side: an interval of it
        # would look precise and mean nothing, as DeLong's variance is undefined there.
        if boot is None or (test is not None and min(test.n_pos, test.n_neg) < 2):
            return dict.fromkeys(("bootstrap_ci_low", "bootstrap_ci_high", "bootstrap_p", "bootstrap_valid_draws"))
        if c is None:
            return {"bootstrap_ci_low": _num(boot.mean_low), "bootstrap_ci_high": _num(boot.mean_high),
                    "bootstrap_p": _num(boot.mean_p), "bootstrap_valid_draws": boot.mean_valid}
        return {"bootstrap_ci_low": _num(boot.low[c]), "bootstrap_ci_high": _num(boot.high[c]),
                "bootstrap_p": _num(boot.p[c]), "bootstrap_valid_draws": int(boot.valid[c])}

    pair = {"run": run.name, "reference": ref.name}
    rows, tests = [], delong_per_class(y, run.probs, ref.probs, mask)
    for c, (name, t) in enumerate(zip(ref.label_names, tests)):
        rows.append({**pair, "class": name, "n_pos": t.n_pos, "n_neg": t.n_neg, "auroc": t.auc_a,
                     "auroc_reference": t.auc_b, "difference": t.difference, "delong_se": t.se, "delong_z": t.z,
                     "delong_p": t.p, "delong_ci_low": t.ci_low, "delong_ci_high": t.ci_high, **bootstrap(c, t),
                     "note": t.note})
    scored = [t for t in tests if t.auc_a is not None]  # both runs score the same classes: one truth
    a = float(np.mean([t.auc_a for t in scored])) if scored else None
    b = float(np.mean([t.auc_b for t in scored])) if scored else None
    rows.append({**pair, "class": "mean", "auroc": a, "auroc_reference": b, "difference": None if a is None else a - b,
                 **bootstrap(), "note": f"over the {len(scored)} classes with an AUROC; no DeLong test (one class at "
                                        "a time): the interval and p are the bootstrap's"})
    return rows


def paired_comparison(runs: list[Run], reference: str | None = None, draws: int = BOOTSTRAP_DRAWS,
                      seed: int = BOOTSTRAP_SEED) -> Paired:
    """Every run against the reference on the same images (check_comparable first): per class the AUROC
    difference (run - reference) with DeLong's test, Holm-adjusted over the table's tests; per class and for
    the mean, the paired patient-level bootstrap interval and p (no bootstrap with draws=0)."""
    ref = reference_run(runs, reference)
    others = [r for r in runs if r is not ref]
    y, mask = _truth(ref)
    patient_ids = next((r.patient_id for r in (ref, *others) if r.patient_id is not None), None)
    boots = (paired_auroc_differences(y, ref.probs, [r.probs for r in others], mask, patient_ids, ref.label_names,
                                      draws, seed) if draws else [None] * len(others))
    frame = pd.DataFrame([row for run, boot in zip(others, boots) for row in _pair_rows(run, ref, y, mask, boot)])
    frame.insert(frame.columns.get_loc("delong_p") + 1, "delong_p_holm", holm([_num(p) for p in frame["delong_p"]]))
    for column in ("n_pos", "n_neg", "bootstrap_valid_draws"):  # counts stay integers beside the mean's blank
        frame[column] = frame[column].astype("Int64")
    notes = list(dict.fromkeys(n for b in boots if b for n in b.notes))
    if patient_ids is None and draws:
        notes.append("the runs' predictions files have no patient_id column (written before it was recorded): "
                     "the bootstrap resamples images")
    groups, _, _ = patient_groups(patient_ids, len(y))
    n_patients = None if patient_ids is None else int(groups.max()) + 1 if len(groups) else 0
    return Paired(ref.name, frame, len(y), n_patients, draws, seed, int(frame["delong_p"].notna().sum()), notes)


def _fmt(value, spec: str = ".3f") -> str:
    """A number for the tables; an undefined one (None, NaN) as UNDEFINED, never "nan"."""
    return UNDEFINED if _num(value) is None else format(value, spec)


def _p(value) -> str:
    return UNDEFINED if _num(value) is None else ("<0.001" if value < 0.001 else f"{value:.3f}")


def _paired_row(r: dict) -> str:
    mean = r["class"] == "mean"
    interval = (UNDEFINED if r["bootstrap_ci_low"] is None
                else f"{r['bootstrap_ci_low']:+.3f} to {r['bootstrap_ci_high']:+.3f}")
    if mean:
        name, counts, holm_p = "**mean**", "", UNDEFINED
        p = UNDEFINED if r["bootstrap_p"] is None else f"{_p(r['bootstrap_p'])} (bootstrap)"
    else:
        name, counts, holm_p, p = r["class"], f"{r['n_pos']} / {r['n_neg']}", _p(r["delong_p_holm"]), _p(r["delong_p"])
    return (f"| {name} | {counts} | {_fmt(r['auroc'])} | {_fmt(r['auroc_reference'])} | "
            f"{_fmt(r['difference'], '+.3f')} | {interval} | {p} | {holm_p} |")


def paired_lines(paired: Paired, split: str) -> list[str]:
    """The paired section of comparison.md (also what compare prints)."""
    unit = "patients" if paired.n_patients is not None else "images"
    who = f"{paired.n_images} images" + (f" of {paired.n_patients} patients" if paired.n_patients is not None else "")
    how = (f"paired bootstrap over {unit}, {paired.draws} draws (seed {paired.seed}), every draw the same {unit} for "
           "both runs; 95% percentile interval" if paired.draws else "no bootstrap (--bootstrap-draws 0)")
    frame = paired.frame.astype(object).where(paired.frame.notna(), None)
    several = frame["class"].nunique() > 2  # a class and the mean: one label, whose mean row would repeat it
    if not several:
        frame = frame[frame["class"] != "mean"]
    lines = ["", f"## Paired differences against {paired.reference} ({split}, the same {who})", "",
             f"Difference: run − {paired.reference}. p (DeLong): DeLong's test of the two correlated AUROCs of a "
             f"class (Sun & Xu's algorithm). Interval: {how}."
             + (" The mean has no DeLong test: its interval and p (marked bootstrap) come from the bootstrap."
                if several else "")]
    for run, rows in frame.groupby("run", sort=False):
        lines += ["", f"### {run} − {paired.reference}", "",
                  f"| class | positives / negatives | {run} | {paired.reference} | difference | 95% interval | "
                  "p (DeLong) | p (Holm) |", "|" + " --- |" * 8, *map(_paired_row, rows.to_dict("records"))]
    if paired.tests > 1:
        held = [f"{r['class']} ({r['run']})" for r in frame.to_dict("records")
                if r["class"] != "mean" and r["delong_p_holm"] is not None and r["delong_p_holm"] < 0.05]
        lines += ["", f"Multiple comparisons: {paired.tests} per-class tests in this table; at p < 0.05 about "
                  f"{0.05 * paired.tests:.1f} of them would look different by chance if no class differed. p (Holm) "
                  f"is adjusted over all of them (family-wise error 5%); {len(held)} of {paired.tests} differences "
                  "hold at Holm p < 0.05" + (": " + ", ".join(held) if held else "") + "."]
    lines += [""] * bool(paired.notes) + [f"- {n}" for n in paired.notes]
    return lines


def _cell(row) -> str:
    if row is None or row["auroc"] is None or not math.isfinite(row["auroc"]):
        return UNDEFINED
    text = f"{row['auroc']:.3f}"
    if row["ci_low"] is not None and row["ci_high"] is not None and math.isfinite(row["ci_low"]):
        text += f" ({row['ci_low']:.2f}-{row['ci_high']:.2f})"
    return text


def render_markdown(runs: list[Run], split: str, frame: pd.DataFrame, paired: Paired | None = None) -> str:
    first = runs[0]
    n_images = len(first.truth)
    lines = [f"# {len(runs)} runs compared on the same {n_images} {split} images", "",
             "| run | directory |", "| --- | --- |",
             *[f"| {r.name} | `{r.path}` |" for r in runs], ""]
    differ = differing_settings(runs)
    if differ:
        lines += ["## Settings that differ", "", "| setting | " + " | ".join(r.name for r in runs) + " |",
                  "|" + " --- |" * (len(runs) + 1)]
        lines += [f"| {k} | " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
                  for k, values in differ.items()]
    else:
        lines += ["The runs' settings are the same (repeats of one configuration)."]
    by = {(r["run"], r["class"]): r for r in frame.to_dict("records")}
    lines += ["", f"## {split} AUROC (95% bootstrap interval, where the run drew one)", "",
              "| class | positives / negatives | " + " | ".join(r.name for r in runs) + " |",
              "|" + " --- |" * (len(runs) + 2)]
    for name in [*first.label_names, *["mean"] * (len(first.label_names) > 1)]:  # one label: no mean repeating it
        entries = [by[(r.name, name)] for r in runs]
        values = [e["auroc"] for e in entries if e["auroc"] is not None and math.isfinite(e["auroc"])]
        best = max(values) if len(values) > 1 else None
        cells = [f"**{_cell(e)}**" if best is not None and e["auroc"] == best else _cell(e) for e in entries]
        count = "" if name == "mean" else f"{int(entries[0]['n_pos'])} / {int(entries[0]['n_neg'])}"
        lines.append(f"| {'**mean**' if name == 'mean' else name} | {count} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the highest AUROC in the row. Intervals come from each run's own bootstrap (its report says "
              "how it was drawn); overlapping intervals are not a paired test of the difference"
              + (": the paired differences below are." if paired is not None else ".")]
    lines += paired_lines(paired, split) if paired is not None else []
    lines += _baseline_lines(runs)
    lines += _policy_lines(runs, split, frame)
    lines += _localization_lines(runs)
    return "\n".join(lines) + "\n"


def _dataset_and_policy(run: Run) -> tuple[str | None, str | None]:
    config = run.config
    dataset = config.get("dataset") or next((s.get("dataset") for s in config.get("stores", [])), None)
    return dataset, config.get("settings", {}).get("policy")


def _baseline_lines(runs: list[Run]) -> list[str]:
    """The published AUROCs of the runs' dataset (and policy), as a reference table of their own."""
    from common.evaluation.baselines import for_dataset

    kinds = {_dataset_and_policy(r) for r in runs}
    if len(kinds) != 1:
        return []
    baselines = for_dataset(*kinds.pop())
    names = [n for n in runs[0].label_names if any(n in b.auroc for b in baselines)]
    if not baselines or not names:
        return []
    lines = ["", "## Published AUROC of the same labels (reference only: the papers' own splits)", "",
             "| class | " + " | ".join(b.title for b in baselines) + " |", "|" + " --- |" * (len(baselines) + 1)]
    lines += [f"| {n} | " + " | ".join(f"{b.auroc[n]:.3f}" if n in b.auroc else UNDEFINED for b in baselines) + " |"
              for n in names]
    means = [sum(b.auroc[n] for n in names if n in b.auroc) / max(1, sum(n in b.auroc for n in names))
             for b in baselines]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines += ["", *[f"- {b.title}: {b.source}" for b in baselines]]
    return lines


def policy_confounds(runs: list[Run]) -> list[str]:
    """What else differs between runs besides the uncertain-label policy and how they were scored: their kind,
    features (backbones, weights, views, one store or fused), stores and training settings."""
    differ = [k for k in differing_settings(runs) if k != "policy" and k.split(".")[0] not in SCORING_SETTINGS]
    stores = {json.dumps([s.get("manifest_sha256") for s in r.config.get("stores", [])]) for r in runs}
    return differ + (["stores"] if len(stores) > 1 else [])


def uncertain_labels(runs: list[Run], split: str) -> int:
    """Uncertain labels among the first run's scored images of `split` and val: the only entries the ground truth
    leaves out of their class (common.data.targets.eval_targets), -1 in a predictions file. NIH has none;
    CheXpert's val, drawn from its training table, has thousands."""
    count = int((_truth(runs[0])[1] == 0).sum())
    val = runs[0].path / rundir.PREDICTIONS / "val.parquet"
    if split != "val" and val.is_file():
        columns = [rundir.TARGET_PREFIX + n for n in runs[0].label_names]
        count += int((pq.read_table(val, columns=columns).to_pandas().to_numpy() < 0).sum())
    return count


def _policy_lines(runs: list[Run], split: str, frame: pd.DataFrame) -> list[str]:
    """Where the runs differ in their uncertain-label policy alone, on labels that hold uncertain entries: per
    class, the policy that won here with its DeLong p against the runner-up, beside (CheXpert only) the one that
    won in the CheXpert paper's table among the same policies. Otherwise one line on why there is no such table."""
    from common.evaluation.baselines import CHEXPERT_2019

    policies = [_dataset_and_policy(r)[1] for r in runs]
    if len(set(policies)) < 2 or None in policies:
        return []
    title = f"## Which uncertainty policy wins, per class ({split})"
    confounds = policy_confounds(runs)
    if confounds:
        return ["", title, "", f"Not judged: the runs differ in {', '.join(confounds)} besides the policy, so a win "
                "could come from that difference, not the policy."]
    dataset = _dataset_and_policy(runs[0])[0]
    if not uncertain_labels(runs, split):
        return ["", title, "", f"Not judged: the {dataset} labels of these runs' {split} and val images hold no "
                "uncertain (-1) entry; a policy only decides how uncertain labels are trained, so none has "
                "anything to win here (differences are the runs' noise)."]
    by = {r.name: r for r in runs}
    known = [p for p in dict.fromkeys(policies) if p in CHEXPERT_2019] if dataset == "chexpert" else []
    paper = " CheXpert paper's winner among these policies (AUROC) |" if known else ""
    lines = ["", title, "", "| class | winner here (AUROC) | runner-up (AUROC) | difference, p (DeLong) |" + paper,
             "|" + " --- |" * (5 if known else 4)]
    y, mask = _truth(runs[0])
    auc = {(r["run"], r["class"]): r["auroc"] for r in frame.to_dict("records")}
    for c, name in enumerate(runs[0].label_names):
        scored = sorted(((auc[(r.name, name)], p, r.name) for r, p in zip(runs, policies)
                         if _num(auc.get((r.name, name))) is not None), reverse=True)
        cells = [f"{p} ({a:.3f})" for a, p, _ in scored[:2]] + [UNDEFINED] * (2 - min(2, len(scored)))
        test = UNDEFINED
        if len(scored) > 1:
            keep = mask[:, c]
            t = delong_test(y[keep, c], by[scored[0][2]].probs[keep, c], by[scored[1][2]].probs[keep, c])
            test = f"{_fmt(t.difference, '+.3f')}, p {_p(t.p)}"
        row = f"| {name} | {cells[0]} | {cells[1]} | {test} |"
        if known:
            ranks = [(CHEXPERT_2019[p].auroc[name], p) for p in known if name in CHEXPERT_2019[p].auroc]
            row += f" {f'{max(ranks)[1]} ({max(ranks)[0]:.3f})' if ranks else UNDEFINED} |"
        lines.append(row)
    lines += ["", "A win with DeLong p >= 0.05 is not evidence that the policy is better on this class."]
    return lines


def localization_frame(runs: list[Run]) -> pd.DataFrame:
    """The overall CAM/heatmap localization accuracy of the runs that scored boxes: run, measure,
    threshold, accuracy, boxes."""
    rows = []
    for run in runs:
        loc = run.metrics.get("localization") or {}
        for r in loc.get("table", []):
            if r.get("label") == "all":
                rows.append({"run": run.name, "measure": r["measure"], "threshold": r["threshold"],
                             "accuracy": r["accuracy"], "boxes": r["n"], "split": loc.get("split")})
    return pd.DataFrame(rows, columns=["run", "measure", "threshold", "accuracy", "boxes", "split"])


def _localization_lines(runs: list[Run]) -> list[str]:
    frame = localization_frame(runs)
    if frame.empty:
        return []
    scored = [r for r in runs if r.name in set(frame["run"])]
    lines = ["", "## Localization accuracy (share of radiologist boxes a heatmap box overlaps by more than T)", "",
             "| measure | T | " + " | ".join(r.name for r in scored) + " |", "|" + " --- |" * (len(scored) + 2)]
    cell = {(r["run"], r["measure"], r["threshold"]): r for r in frame.to_dict("records")}
    for (measure, threshold), _ in frame.groupby(["measure", "threshold"], sort=False):
        values = [cell.get((r.name, measure, threshold)) for r in scored]
        lines.append(f"| {measure} | {threshold:g} | " + " | ".join(
            f"{v['accuracy']:.3f} ({v['boxes']} boxes, {v['split']})" if v else UNDEFINED for v in values) + " |")
    missing = [r.name for r in runs if r not in scored]
    if missing:
        lines += ["", f"Not scored for localization: {', '.join(missing)} (no --bbox-list, or a model without maps)."]
    return lines


def write_comparison(runs: list[Run], split: str, out: Path, paired: Paired | None = None) -> tuple[Path, Path, Path]:
    """comparison.md, comparison.csv (each run's own metrics) and comparison_paired.csv (`paired`, computed here
    when not given) in `out`, each written whole (temporary name, then renamed)."""
    frame = comparison_frame(runs, split)
    paired = paired or paired_comparison(runs)
    out.mkdir(parents=True, exist_ok=True)
    md, csv, paired_csv = out / TABLE_MD, out / TABLE_CSV, out / PAIRED_CSV
    for path, text in ((md, render_markdown(runs, split, frame, paired)), (csv, frame.to_csv(index=False)),
                       (paired_csv, paired.frame.to_csv(index=False))):
        atomic.write_text(path, text)
    return md, csv, paired_csv
