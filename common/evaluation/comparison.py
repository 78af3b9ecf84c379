"""Runs side by side: per-class and mean AUROC with their bootstrap intervals, and the settings
that differ between the runs (LeDNet's original vs lung-masked vs fused comparison, one policy
against another, a head against a fine-tune).

Only runs scored on the same images with the same ground truth are compared: a table whose
columns were measured on different test sets would compare the sets, not the models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from common import atomic
from common.runs import rundir

COMPARED_KINDS = ("head", "finetune", "evaluation", "ensemble")
TABLE_MD, TABLE_CSV = "comparison.md", "comparison.csv"
# Settings that say where a run wrote or how loudly, not what it learned.
NOT_SETTINGS = {"out", "overwrite", "quiet", "threads", "config", "log_seconds", "progress_interval"}


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
    columns = ["image_id", *(rundir.TARGET_PREFIX + n for n in metrics["label_names"])]
    try:
        truth = pq.read_table(predictions, columns=columns).to_pandas()
    except Exception as exc:  # a foreign or damaged file: name it
        raise CompareError(f"{predictions}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    truth = truth.sort_values("image_id", kind="stable").reset_index(drop=True)
    return Run(name or path.name, path, marker["kind"], rundir.read_json(path / rundir.CONFIG), metrics, truth)


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
    if run.kind in ("head", "evaluation"):  # an evaluation records the stores it scored, as a head run
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


def _cell(row) -> str:
    if row is None or row["auroc"] is None or not math.isfinite(row["auroc"]):
        return "—"
    text = f"{row['auroc']:.3f}"
    if row["ci_low"] is not None and row["ci_high"] is not None and math.isfinite(row["ci_low"]):
        text += f" ({row['ci_low']:.2f}-{row['ci_high']:.2f})"
    return text


def render_markdown(runs: list[Run], split: str, frame: pd.DataFrame) -> str:
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
    for name in [*first.label_names, "mean"]:
        entries = [by[(r.name, name)] for r in runs]
        values = [e["auroc"] for e in entries if e["auroc"] is not None and math.isfinite(e["auroc"])]
        best = max(values) if len(values) > 1 else None
        cells = [f"**{_cell(e)}**" if best is not None and e["auroc"] == best else _cell(e) for e in entries]
        count = "" if name == "mean" else f"{int(entries[0]['n_pos'])} / {int(entries[0]['n_neg'])}"
        lines.append(f"| {'**mean**' if name == 'mean' else name} | {count} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the highest AUROC in the row. Intervals come from each run's own bootstrap (its report says "
              "how it was drawn); overlapping intervals are not a paired test of the difference."]
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
    lines += [f"| {n} | " + " | ".join(f"{b.auroc[n]:.3f}" if n in b.auroc else "—" for b in baselines) + " |"
              for n in names]
    means = [sum(b.auroc[n] for n in names if n in b.auroc) / max(1, sum(n in b.auroc for n in names))
             for b in baselines]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines += ["", *[f"- {b.title}: {b.source}" for b in baselines]]
    return lines


def _policy_lines(runs: list[Run], split: str, frame: pd.DataFrame) -> list[str]:
    """Where the runs differ in their uncertain-label policy only: per class, the policy that won here
    beside the one that won in the CheXpert paper's table among the same policies."""
    from common.evaluation.baselines import CHEXPERT_2019

    policies = [_dataset_and_policy(r)[1] for r in runs]
    if len(set(policies)) < 2 or None in policies:
        return []
    by = {(r["run"], r["class"]): r["auroc"] for r in frame.to_dict("records")}
    known = [p for p in dict.fromkeys(policies) if p in CHEXPERT_2019]
    lines = ["", f"## Which uncertainty policy wins, per class ({split})", "",
             "| class | winner here (AUROC) | CheXpert paper's winner among these policies (AUROC) |",
             "| --- | --- | --- |"]
    for name in runs[0].label_names:
        scored = [(by.get((r.name, name)), p) for r, p in zip(runs, policies)]
        scored = [(a, p) for a, p in scored if a is not None and math.isfinite(a)]
        here = max(scored) if scored else None
        paper = [(CHEXPERT_2019[p].auroc[name], p) for p in known if name in CHEXPERT_2019[p].auroc]
        best = max(paper) if paper else None
        lines.append(f"| {name} | {f'{here[1]} ({here[0]:.3f})' if here else '—'} | "
                     f"{f'{best[1]} ({best[0]:.3f})' if best else '—'} |")
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
            f"{v['accuracy']:.3f} ({v['boxes']} boxes, {v['split']})" if v else "—" for v in values) + " |")
    missing = [r.name for r in runs if r not in scored]
    if missing:
        lines += ["", f"Not scored for localization: {', '.join(missing)} (no --bbox-list, or a model without maps)."]
    return lines


def write_comparison(runs: list[Run], split: str, out: Path) -> tuple[Path, Path]:
    """comparison.md and comparison.csv in `out`, each written whole (temporary name, then renamed)."""
    frame = comparison_frame(runs, split)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / TABLE_MD, out / TABLE_CSV
    for path, text in ((md, render_markdown(runs, split, frame)), (csv, frame.to_csv(index=False))):
        atomic.write_text(path, text)
    return md, csv
