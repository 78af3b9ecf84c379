"""Render a run's report.md, ROC and precision-recall curves, reliability diagrams and loss curves
from the files heads.train (or the fine-tuning job, jobs/fine_tune.py) wrote.

Nothing is recomputed except the curves' points (from predictions/<split>.parquet), so a
re-render shows exactly the run's metrics.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # the OO API: no pyplot, no GUI backend needed
from sklearn.metrics import precision_recall_curve, roc_curve

from common.runs import rundir
from common.evaluation import calibration, operating_points
from common.evaluation.baselines import for_dataset
from common.evaluation import subgroups
from common.evaluation.text import averaged, entry_with_interval, finding_aucs_apply, number
from common.evaluation.model_card import threshold_fallbacks
from common.images.data_config import DataConfig
from common.training.losses import loss_text


# One rendering of undefined values in every report (common/evaluation/text.py).
_f = number
_with_ci = entry_with_interval


def _bootstrap_lines(splits: dict, several: bool = True) -> list[str]:
    """How the AUROC intervals were made: one line per distinct setting (one, unless a split lacked patient ids)."""
    described: dict[str, list[str]] = {}
    for name, m in splits.items():
        b = m.get("bootstrap")
        if not b:
            continue
        lo, hi = b["percentiles"]
        whole = ", each with all their images" if b["unit"] == "patient" else ""
        text = (f"{hi - lo:g}% percentile intervals ({lo:g}th-{hi:g}th) of a {b['unit']}-level bootstrap: "
                f"{b['draws']} draws of a split's {b['unit']}s with replacement{whole}, seed {b['seed']}; a draw "
                f"without a positive or a negative of a class is skipped for it"
                + (" (the mean: over the classes left in the draw)" if several else "")
                + f"; no interval with fewer than {b['min_valid_draws']} valid draws")
        described.setdefault(text, []).append(f"{name} {b['units']} {b['unit']}s")
    return [""] + [f"AUROC intervals: {text} ({', '.join(n)})." for text, n in described.items()] if described else []


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _nanmean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def plot_loss(history: list[dict], path: Path, auroc: str = "mean AUROC") -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_auc"] if h["val_auc"] is not None else np.nan for h in history], "g--",
             label=f"val {auroc}")
    ax2.set_ylabel(f"val {auroc}")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _scorable_classes(pred: dict, names: list[str]):
    """(name, truth, probabilities, colour, line style) of each class with a positive and a negative, the
    same class in the same colour on every plot: ten distinct hues, then the same hues dashed (tab20's
    light/dark pairs look alike). A class without both has no curve; the report's notes say why."""
    colors = colormaps["tab10"].colors
    for c, name in enumerate(names):
        keep = pred["mask"][:, c]
        y = pred["y"][keep, c]
        if y.size and y.min() != y.max():
            yield name, y, pred["probs"][keep, c], colors[c % len(colors)], "-" if c < len(colors) else "--"


def plot_roc(pred: dict, names: list[str], aucs: dict, title: str, path: Path) -> None:
    fig = Figure(figsize=(7, 7))
    ax = fig.add_subplot()
    for name, y, probs, colour, ls in _scorable_classes(pred, names):
        fpr, tpr, _ = roc_curve(y, probs)
        ax.plot(fpr, tpr, lw=1.4, color=colour, ls=ls, label=f"{name} ({_f(aucs.get(name))})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # no class with both positives and negatives: no legend
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_pr(pred: dict, names: list[str], per_class: dict, title: str, path: Path) -> None:
    """Precision-recall curves; each class's prevalence (a random ranking's precision) dotted in its colour."""
    fig = Figure(figsize=(7, 7))
    ax = fig.add_subplot()
    for name, y, probs, colour, ls in _scorable_classes(pred, names):
        precision, recall, _ = precision_recall_curve(y, probs)
        e = per_class.get(name, {})
        ax.step(recall, precision, where="post", lw=1.4, color=colour, ls=ls,
                label=f"{name} ({_f(e.get('auprc'))}; prevalence {_f(e.get('prevalence'))})")
        ax.axhline(y.mean(), color=colour, lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right", title="AUPRC; dotted: prevalence", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _per_class_rows(metrics: dict, headline: str, baselines,
                    finding_aucs: bool = True) -> tuple[list[str], list[list[str]]]:
    """A row per class and, over several classes, their mean (one label is its own result: no mean row);
    D-AUC and N-AUC only where they say something (`finding_aucs`)."""
    names = metrics["label_names"]
    splits = metrics["splits"]
    header = ["label", f"{headline} positives"]
    header += [f"{s} AUROC" for s in splits]
    by_study = [s for s in splits if "study_level" in splits[s]]  # CheXpert: also per study, side by side
    header += [f"{s} study AUROC" for s in by_study]
    header += [f"{headline} AUPRC", f"{headline} prevalence"]  # a random ranking's AUPRC is the prevalence
    header += [f"{headline} D-AUC", f"{headline} N-AUC"] if finding_aucs else []
    header += ["F1@0.5", "F1@val thr", "val thr"]
    header += [b.title for b in baselines]
    rows, columns = [], []
    fallbacks = threshold_fallbacks(metrics)
    auroc = slice(1, 1 + len(splits))  # the AUROC cells of a row, after the positives
    for name in names:
        m = splits[headline]["per_class"][name]
        tuned = m.get("at_val_threshold", {})
        values = [m["n_pos"], *[splits[s]["per_class"][name]["auroc"] for s in splits],
                  *[splits[s]["study_level"]["per_class"][name]["auroc"] for s in by_study], m.get("auprc"),
                  m.get("prevalence"), *([m["d_auc"], m["n_auc"]] if finding_aucs else []),
                  m["at_0.5"]["f1"], tuned.get("f1"), tuned.get("threshold")]
        values += [b.auroc.get(name) for b in baselines]
        columns.append(values)
        cells = [_f(v) for v in values]
        if name in fallbacks:  # not chosen on val: say so where the number stands
            cells[header.index("val thr") - 1] += " (0.5 fallback: no val positive)"
        cells[auroc] = [_with_ci(splits[s]["per_class"][name], "auroc") for s in splits]
        rows.append([name] + cells)
    if len(columns) < 2:
        return header, rows
    means = [""] + [_f(_nanmean(col)) for col in list(zip(*columns))[1:]]
    means[auroc] = [_with_ci(splits[s]["summary"], "mean_auc") for s in splits]  # the same mean, with its interval
    means[header.index("val thr") - 1] = ""  # a mean of per-class thresholds means nothing
    return header, rows + [["**mean**"] + means]


def _summary_keys(names: list[str], finding_aucs: bool) -> list[tuple[str, str]]:
    """The summary table's metrics.json keys and titles: means and macro F1 over several labels; for one
    label its AUROC, AUPRC and F1 (a W-AUC of one class is its AUROC); D-AUC and N-AUC where they apply."""
    many = len(names) != 1
    keys = [("mean_auc", averaged(names)), ("mean_auprc", averaged(names, "AUPRC"))]
    keys += [("w_auc", "W-AUC")] if many else []
    keys += [("mean_d_auc", averaged(names, "D-AUC")), ("mean_n_auc", averaged(names, "N-AUC"))] if finding_aucs else []
    f1 = "macro F1" if many else "F1"
    return keys + [("macro_f1_at_0.5", f"{f1}@0.5"), ("macro_f1_at_val_threshold", f"{f1}@val thr")]


def shown_notes(metrics: dict) -> list[str]:
    """A run's notes as its report lists them: grouped by kind (group_notes), without the undefined D-AUC and
    N-AUC of a run where neither applies (finding_aucs_apply: the report says so once)."""
    names, notes = metrics["label_names"], metrics["notes"]
    if not any(finding_aucs_apply(m, names) for m in metrics["splits"].values()):
        notes = [n for n in notes if not ((m := _NAN_NOTE.match(n)) and m["metric"] in ("D-AUC", "N-AUC"))]
    return group_notes(notes, names)


_NAN_NOTE = re.compile(r"^(?P<split>\w+): (?P<label>.+?): no (?P<what>[\w ]+?), (?P<metric>[\w-]+) is NaN$")
_PER_LABEL = re.compile(r"^(?P<prefix>\w+): (?P<label>[^:]+): (?P<rest>.+)$")


def group_notes(notes: list[str], labels: list[str]) -> list[str]:
    """One line per kind instead of one per label: "val: Edema: no positives, AUROC is NaN", its
    D-AUC and N-AUC twins and the same for Hernia become "val: Edema, Hernia: no positives, AUROC,
    D-AUC, N-AUC undefined"; any notes that differ only in the label join the same way."""
    merged: list[str] = []  # pass 1: a label's NaN metrics in one note
    metrics_at: dict[tuple, int] = {}
    for note in notes:
        m = _NAN_NOTE.match(note)
        if not m or m["label"] not in labels:
            merged.append(note)
            continue
        key = (m["split"], m["label"], m["what"])
        if key in metrics_at:
            merged[metrics_at[key]] += f", {m['metric']}"
        else:
            metrics_at[key] = len(merged)
            merged.append(f"{m['split']}: {m['label']}: no {m['what']}, {m['metric']}")
    for key, i in metrics_at.items():
        merged[i] += " undefined"
    lines: list = []  # pass 2: notes equal but for the label share a line
    by_kind: dict[tuple, list[str]] = {}
    for note in merged:
        m = _PER_LABEL.match(note)
        if not m or m["label"] not in labels:
            lines.append(note)
            continue
        kind = (m["prefix"], m["rest"])
        if kind not in by_kind:
            by_kind[kind] = []
            lines.append(kind)
        by_kind[kind].append(m["label"])
    return [line if isinstance(line, str) else f"{line[0]}: {', '.join(by_kind[line])}: {line[1]}" for line in lines]


def _head_run_lines(config: dict, metrics: dict) -> list[str]:
    """The "Run" section of a head trained on feature stores (heads.train)."""
    names, s = metrics["label_names"], config["settings"]
    lines = []
    for st in config["stores"]:
        lines.append(f"- store `{st['path']}`: {st['dataset']}, {st['backbone']} ({st['weights']}), "
                     f"{st['feature_dim']}-d, manifest sha256 `{st['manifest_sha256'][:12]}`")
    head = config["head"]
    sizes = "→".join(str(v) for v in (head["in_dim"], *head["hidden"], head["n_out"]))
    return lines + [
        f"- head: {head['kind']} {sizes}" + (f", dropout {head['dropout']:g}" if head["dropout"] else ""),
        f"- inputs: {config['input_width']} wide" + (f", with age/100 and sex ({s['sex_encoding']})" if s["age_sex"] else "")
        + ", standardized with train statistics",
        f"- labels ({len(names)}): {', '.join(names)}; uncertain-label policy U-{s['policy'].capitalize()}",
        f"- loss {loss_text(s)}; Adam lr {metrics['selected']['lr']:g}, weight decay {metrics['selected']['weight_decay']:g}, "
        f"batch {s['batch_size']}; {config['precision_resolved']}; init seed {s['init_seed']}",
        f"- best epoch {metrics['best_epoch']} of {len(metrics['history'])} ({metrics['stopped']}); "
        f"training {metrics['train_seconds']:.1f} s",
    ]


def _finetune_run_lines(config: dict, metrics: dict) -> list[str]:
    """The "Run" section of a model fine-tuned on images (jobs/fine_tune.py)."""
    names, s, t = metrics["label_names"], config["settings"], metrics["training"]
    images = ", ".join(f"{n} {k}" for k, n in config["images"].items())
    schedule = (f"x{s['lr_factor']:g} every {s['step_epochs']} epochs" if s["schedule"] == "step"
                else f"x{s['lr_factor']:g} on a plateau of {s.get('best_metric') or 'val_loss'} "
                     f"of {s['plateau_patience']} epoch(s)")
    resumed = t.get("resumed_from")
    return [
        f"- images: {config['dataset']}, {images} ({config['split_method'].get('kind')} split); "
        f"{len(metrics['unreadable'])} unreadable, left out",
        f"- model: {s['backbone']} from {config['weights']['label']}, {len(names)}-way linear classifier, "
        + ("backbone frozen (classifier only)" if s["freeze_backbone"] else "every layer trained"),
        f"- input: {DataConfig.from_dict(config['data_config']).describe()}; training views: "
        f"{DataConfig.from_dict(config['data_config']).describe_training()}",
        f"- labels ({len(names)}): {', '.join(names)}; uncertain-label policy U-{s['policy'].capitalize()}",
        f"- loss {loss_text(s)}; Adam lr {s['lr']:g}, weight decay {s['weight_decay']:g}, lr {schedule}; "
        f"batch {s['batch_size']} x {t['world_size']} process(es) on {t['device']}; {t['precision']}; "
        f"seed {s['train_seed']}",
        f"- best epoch {metrics['best_epoch']} of {len(metrics['history'])} by {s['best_metric']} ({metrics['stopped']}); "
        f"training {metrics['train_seconds']:.1f} s, {t['global_step']} steps"
        + (f"; resumed at epoch {resumed['epoch']}, step {resumed['step']}" if resumed else ""),
    ]


RUN_KINDS = {  # config.json "kind" -> report title, "Run" section lines
    "head": ("Head training report", _head_run_lines),
    "finetune": ("Fine-tuning report", _finetune_run_lines),
}


def _localization_lines(loc: dict) -> list[str]:
    """Wang et al.'s accuracy table: a row per label, a column per IoU / IoBB threshold, and how many boxes
    were met by a predicted box over half the image (runs from before that count lack the column)."""
    rows: dict[str, dict] = {}
    for r in loc["table"]:
        row = rows.setdefault(r["label"], {"n": r["n"]})
        row[f"{r['measure']}>{r['threshold']:g}"] = r["accuracy"]
        if "large_boxes" in r:
            row["large"] = r["large_boxes"]
    columns = [c for c in next(iter(rows.values())) if c not in ("n", "large")]
    large = "large" in next(iter(rows.values()))
    header = ["label", "boxes"] + (["met by a box over half the image"] if large else [])
    header += [c.replace("iou", "IoU").replace("iobb", "IoBB") for c in columns]
    body = [[label, str(v["n"])] + ([str(v["large"])] if large else []) + [_f(v.get(c), 2) for c in columns]
            for label, v in rows.items()]
    lines = ["", "## Localization (class activation maps)", "",
             f"{loc['boxes']} radiologist boxes on {loc['images']} {loc['split']} images ({loc['box_list']}); each "
             f"label's map from the last conv features and the classifier weights, on the model's input "
             f"({loc['input']}), carried back onto the box grid and thresholded at 180/255 into boxes. Accuracy: "
             "the share of boxes that a predicted box overlaps by more than T (Wang et al. 2017).", ""]
    lines += _table(header, body)
    if large and any(v["large"] for v in rows.values()):
        lines += ["", "A predicted box over half the image overlaps nearly any radiologist box by IoU > 0.1: the "
                      "hits of the boxes counted in the third column are near-automatic, not localization."]
    if loc["overlays"]:
        lines += ["", "Overlays (the map on viridis with its colour scale; radiologist boxes solid white, boxes from "
                      "the map dashed magenta; a note on any predicted box over half the image):", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in loc["overlays"]]
    return lines


def render(run: str | Path) -> Path:
    """Write report.md, loss.png and roc_<split>.png into the run directory; returns report.md."""
    run = Path(run)
    config = rundir.read_json(run / rundir.CONFIG)
    metrics = rundir.read_json(run / rundir.METRICS)
    names, splits = metrics["label_names"], metrics["splits"]
    title, run_lines = RUN_KINDS[config.get("kind", "head")]
    headline = "test" if "test" in splits else "val"
    baselines = [b for b in for_dataset(config.get("dataset", ""), config.get("settings", {}).get("policy")) if any(n in b.auroc for n in names)]

    if metrics["history"]:
        plot_loss(metrics["history"], run / rundir.LOSS_PLOT, averaged(names))
    for split in splits:
        pred_file = run / rundir.PREDICTIONS / f"{split}.parquet"
        if pred_file.is_file():
            aucs = {n: splits[split]["per_class"][n]["auroc"] for n in names}
            pred = rundir.read_predictions(pred_file, names)
            plot_roc(pred, names, aucs, f"ROC, {split} split", run / rundir.roc_plot(split))
            plot_pr(pred, names, splits[split]["per_class"], f"Precision-recall, {split} split", run / rundir.pr_plot(split))

    lines = [f"# {title}: {run.name}", "", f"`{config['command']}`", "",
             f"Model card (training data, weights provenance, warnings, intended use): "
             f"[{rundir.MODEL_CARD}]({rundir.MODEL_CARD})", ""]
    lines += ["## Run", ""] + run_lines(config, metrics) + ["", "## Summary", ""]
    finding_aucs = any(finding_aucs_apply(m, names) for m in splits.values())
    summary_keys = _summary_keys(names, finding_aucs)
    lines += _table(["split", "images"] + [t for _, t in summary_keys],
                    [[sp, str(m["n"])] + [_with_ci(m["summary"], k) for k, _ in summary_keys] for sp, m in splits.items()])
    lines += _bootstrap_lines(splits, len(names) != 1)
    lines += ["", f"## Per class ({headline} split unless named)", ""]
    header, rows = _per_class_rows(metrics, headline, baselines, finding_aucs)
    lines += _table(header, rows)
    if not finding_aucs:
        lines += ["", "D-AUC and N-AUC (a class's positives against negatives with another finding, and against "
                      "negatives with none) are not shown: no negative here has another finding, so D-AUC is "
                      "undefined and N-AUC is the AUROC."]
    studies = {s: m["study_level"] for s, m in splits.items() if "study_level" in m}
    if studies:
        first = next(iter(studies.values()))
        lines += ["", f"Study AUROC (the CheXpert paper's evaluation): {first['rule']}; "
                  + ", ".join(f"{s} {v['studies']} studies" for s, v in studies.items())
                  + (f"; {sum(v['label_disagreements'] for v in studies.values())} study labels left out where "
                     "its images disagree" if any(v["label_disagreements"] for v in studies.values()) else "") + "."]
    if baselines:
        lines += ["", "Published AUROCs are from each paper's own split; a reference point, not a like-for-like comparison:"]
        lines += [f"- {b.title}: {b.source}" for b in baselines]
        if any(n not in b.auroc for b in baselines for n in names):
            lines.append("- a baseline's mean is over the labels it reports")
    lines += calibration.report_lines(metrics, run) + operating_points.report_lines(metrics)
    lines += subgroups.report_lines(metrics)
    if metrics.get("localization"):
        lines += _localization_lines(metrics["localization"])
    if metrics["grid"]:
        lines += ["", "## Grid search", "", f"Picked by {metrics['selected']['grid_metric']}.", ""]
        grid_rows = []
        for c in metrics["grid"]:
            pick = c["lr"] == metrics["selected"]["lr"] and c["weight_decay"] == metrics["selected"]["weight_decay"]
            grid_rows.append([f"{c['lr']:g}", f"{c['weight_decay']:g}", str(c["best_epoch"]), _f(c["val_loss"], 4),
                              _f(c["val_auc"], 4), str(c["epochs_run"]), _f(float(c["seconds"]), 1), "✓" if pick else ""])
        lines += _table(["lr", "weight decay", "best epoch", "val loss", "val AUROC", "epochs", "seconds", "picked"], grid_rows)
    lines += ["", "## Curves", "", f"![loss curves]({rundir.LOSS_PLOT})", ""]
    lines += [f"![ROC {sp}]({rundir.roc_plot(sp)})" for sp in splits if (run / rundir.roc_plot(sp)).exists()]
    lines += [f"![PR {sp}]({rundir.pr_plot(sp)})" for sp in splits if (run / rundir.pr_plot(sp)).exists()]
    if notes := shown_notes(metrics):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path = run / rundir.REPORT
    path.write_text("\n".join(lines) + "\n")
    return path
