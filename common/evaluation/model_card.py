"""A run's model card (model_card.md and model_card.json): what a reader needs before trusting its numbers.

Written at the end of every head, fine-tune and ensemble run and re-written by `cxr report`, from the run's
own files only (config.json, metrics.json, calibration.json, the model file): the training data (dataset,
stores, images and prevalence per split), where the weights came from (a random or unverified backbone is a
warning), the test metrics with their counts and intervals, calibration, the largest subgroup gaps, where the
thresholds came from, the intended use and the research-only notice. The service shows the same card and
its warnings (serve/), so the page and the file never disagree.
"""

from __future__ import annotations

from pathlib import Path

from common.evaluation.calibration import read_calibration
from common.evaluation.text import UNDEFINED, averaged, defined, entry_with_interval, number
from common.models.weights import file_sha256
from common.runs import rundir

CARD_FORMAT = "cxr-features/model-card"
CARD_VERSION = 1
NOTICE = "Research tool, not a medical device: not for diagnosis or treatment decisions."
INTENDED_USE = ("Research on chest radiograph classification: comparing backbones, heads, training policies "
                "and evaluation methods on public datasets. Not validated for any clinical population, scanner "
                "or workflow; its probabilities and thresholds must not guide the care of a patient.")
# With no interval, a mean AUROC on fewer test images than this says little either way.
SMALL_TEST = 100
THRESHOLD_RULE = "per class, the probability that maximizes F1 on the val split"
_MODEL_FILES = {"head": rundir.HEAD_CHECKPOINT, "finetune": rundir.BEST}
_KIND_TEXT = {"head": "a head trained on frozen backbone features", "finetune": "a fine-tuned network",
              "ensemble": "an ensemble of finished runs"}


def _read(run: Path, name: str) -> dict:
    return rundir.read_json(run / name) if (run / name).is_file() else {}


def weights_entry(backbone, label, sha256, where: str, trained_whole: bool = False) -> dict:
    """One backbone's provenance and, for random or unverified weights, the warning to show in red."""
    label = str(label) if label is not None else None
    entry = {"backbone": backbone, "weights": label, "sha256": sha256, "where": where, "status": "verified",
             "warning": None}
    if label is None:
        entry["status"] = "unknown"
        entry["warning"] = f"unverified weights: {where} records no weights for {backbone}"
    elif label.startswith("random"):
        entry["status"] = "random"
        entry["warning"] = (f"random weights: {backbone} was initialised at random ({label}) and fine-tuned from "
                            "scratch, with no pretrained image knowledge" if trained_whole else
                            f"random weights: {backbone} was never trained ({label}); its features carry no learned "
                            "image knowledge, so this model is a pipeline check, not a classifier")
    elif not sha256:
        entry["status"] = "unverified"
        entry["warning"] = (f"unverified weights: {backbone} {label} has no sha256 on record ({where}); which file "
                            "was used cannot be checked")
    return entry


def _run_weights(config: dict, kind: str, where: str) -> list[dict]:
    """The weights of a head or fine-tune run from its config.json."""
    if kind == "finetune":
        s, w = config.get("settings", {}), config.get("weights") or {}
        return [weights_entry(s.get("backbone"), w.get("label"), w.get("sha256"), where,
                              trained_whole=not s.get("freeze_backbone", False))]
    stores = config.get("stores") or [{"backbone": "?", "path": "(none recorded)"}]
    return [weights_entry(st.get("backbone"), st.get("weights"), st.get("weights_sha256"),
                          f"{where}, store {st.get('path')}") for st in stores]


def _member_weights(metrics: dict) -> list[dict]:
    """An ensemble's weights: each member's, read from the member's own run directory."""
    out = []
    for member in metrics.get("members") or []:
        path = Path(member["path"])
        marker = rundir.read_marker(path) if path.is_dir() else None
        if marker is None:
            out.append(weights_entry("?", None, None, f"member {path} (gone)"))
            continue
        out += _run_weights(_read(path, rundir.CONFIG), marker.get("kind"), f"member {path.name}")
    return out


def label_counts(y, mask, label_names) -> dict:
    """{label: {"positives", "scored"}} of one split's (n, labels) targets and mask: what config.json records
    of the training split, whose truth is in no predictions file."""
    return {name: {"positives": int(((y[:, c] == 1) & mask[:, c]).sum()), "scored": int(mask[:, c].sum())}
            for c, name in enumerate(label_names)}


def _prevalence(config: dict, metrics: dict) -> dict:
    """split -> label -> {"positives", "scored", "prevalence"}: train from config.json's record, the scored
    splits from metrics.json's counts."""
    out = {}
    for split, counts in (config.get("label_counts") or {}).items():
        out[split] = {n: dict(c) for n, c in counts.items()}
    for split, m in (metrics.get("splits") or {}).items():
        out[split] = {n: {"positives": e["n_pos"], "scored": e["n_pos"] + e["n_neg"]}
                      for n, e in m["per_class"].items()}
    for counts in out.values():
        for c in counts.values():
            c["prevalence"] = c["positives"] / c["scored"] if c["scored"] else None
    return out


def _images(config: dict, metrics: dict) -> dict:
    """Images per split: config.json's record (train included), else the scored splits' counts."""
    images = {split: m["n"] for split, m in (metrics.get("splits") or {}).items()} | (config.get("images") or {})
    return {s: images[s] for s in sorted(images, key=lambda s: (("train", "val", "test") + (s,)).index(s))}


def threshold_fallbacks(metrics: dict) -> list[str]:
    """The classes whose threshold is the 0.5 fallback, not a choice on val: those val had no positive of
    (common.evaluation.metrics.choose_thresholds)."""
    val = (metrics.get("splits") or {}).get("val")
    if not val:
        return []
    return [n for n in metrics.get("label_names", []) if val["per_class"][n]["n_pos"] == 0]


def headline_warnings(split: str | None, m: dict | None) -> list[dict]:
    """What the page's banner says of a headline mean AUROC: none measured, its interval containing 0.5, or
    no interval on few images."""
    if m is None:
        return [{"kind": "no_test", "text": "no test or val metrics recorded: nothing says how well this model does"}]
    s, out = m["summary"], []
    if split != "test":
        out.append({"kind": "no_test", "text": f"no test split: the metrics are on {split}, which chose the "
                                               "thresholds and the stopping epoch, so they flatter the model"})
    low, high, mean = s.get("mean_auc_ci_low"), s.get("mean_auc_ci_high"), s.get("mean_auc")
    auroc = averaged(list(m["per_class"])) if "per_class" in m else "mean AUROC"  # one label's AUROC is no mean
    if not defined(mean):
        out.append({"kind": "chance", "text": f"{split} {auroc} undefined: no class had both positives and "
                                              "negatives"})
    elif defined(low) and defined(high):
        if low <= 0.5 <= high:
            out.append({"kind": "chance", "text": f"{split} {auroc} {mean:.3f} (95% CI {low:.2f}-{high:.2f}, "
                                                  f"{m['n']} images): the interval contains 0.5, no better than "
                                                  "chance on this evidence"})
    elif m["n"] < SMALL_TEST:
        out.append({"kind": "small_test", "text": f"{split} {auroc} {mean:.3f} measured on {m['n']} images "
                                                  "with no interval: too few to tell the model from chance"})
    return out


def _headline(metrics: dict) -> tuple[str | None, dict | None]:
    splits = metrics.get("splits") or {}
    split = "test" if "test" in splits else "val" if "val" in splits else None
    return split, splits.get(split)


def _test_section(split: str | None, m: dict | None) -> dict | None:
    if m is None:
        return None
    keep = ("n_pos", "n_neg", "prevalence", "auroc", "auroc_ci_low", "auroc_ci_high", "auprc")
    per_class = {n: {k: e[k] for k in keep if k in e} for n, e in m["per_class"].items()}
    s = m["summary"]
    return {"split": split, "n": m["n"], "bootstrap": m.get("bootstrap"),
            "mean_auroc": s.get("mean_auc"), "mean_auroc_ci_low": s.get("mean_auc_ci_low"),
            "mean_auroc_ci_high": s.get("mean_auc_ci_high"), "mean_auprc": s.get("mean_auprc"),
            "per_class": per_class}


def _calibration(run: Path, m: dict | None) -> dict | None:
    measured = (m or {}).get("calibration")
    fitted = read_calibration(run)
    if not measured and not fitted:
        return None
    measured, fitted = measured or {}, fitted or {}
    return {**measured, "temperature": fitted.get("temperature"),
            "temperature_fitted_on": fitted.get("fitted_on") or measured.get("temperature_fitted_on")}


def _model(run: Path, kind: str, config: dict, metrics: dict) -> dict:
    model = {"kind": kind, "description": _KIND_TEXT.get(kind, kind), "file": None, "sha256": None}
    name = _MODEL_FILES.get(kind)
    if name and (run / name).is_file():
        model["file"], model["sha256"] = name, file_sha256(str(run / name))
    if kind == "head" and config.get("head"):
        head = config["head"]
        sizes = (head["in_dim"], *head["hidden"], head["n_out"])
        model["head"] = "→".join(map(str, sizes)) + f" {head['kind']}"
    if kind == "ensemble":
        model["combine"] = metrics.get("combine")
        model["members"] = [{k: m.get(k) for k in ("path", "kind", "test_mean_auc")}
                            for m in metrics.get("members", [])]
    return model


def build_card(run: str | Path) -> dict:
    """The model card of run directory `run` as a dict (model_card.json's content)."""
    run = Path(run)
    marker = rundir.read_marker(run) or {}
    config, metrics = _read(run, rundir.CONFIG), _read(run, rundir.METRICS)
    kind = marker.get("kind") or config.get("kind") or "head"
    weights = _member_weights(metrics) if kind == "ensemble" else _run_weights(config, kind, "this run")
    split, m = _headline(metrics)
    names = metrics.get("label_names") or config.get("label_names") or []
    warnings = [{"kind": f"{w['status']}_weights", "text": w["warning"]} for w in weights if w["warning"]]
    warnings += headline_warnings(split, m)
    return {
        "format": CARD_FORMAT, "format_version": CARD_VERSION,
        "run": {"name": run.name, "path": str(run.resolve()), "kind": kind, "command": config.get("command"),
                "finished": config.get("finished") or marker.get("created")},
        "notice": NOTICE,
        "intended_use": INTENDED_USE,
        "warnings": warnings,
        "model": _model(run, kind, config, metrics),
        "weights": weights,
        "training_data": {"dataset": config.get("dataset"),
                          "stores": [{k: st.get(k) for k in ("path", "dataset", "manifest_sha256")}
                                     for st in config.get("stores") or []],
                          "images": _images(config, metrics), "labels": names,
                          "prevalence": _prevalence(config, metrics)},
        "thresholds": {"rule": THRESHOLD_RULE, "chosen_on": "val", "fallback_0.5": threshold_fallbacks(metrics)},
        "test": _test_section(split, m),
        "calibration": _calibration(run, m),
        "subgroup_gaps": ((m or {}).get("subgroups") or {}).get("largest_gaps"),
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if defined(value) else UNDEFINED


def _weights_lines(card: dict) -> list[str]:
    rows = [[str(w["backbone"]), f"`{w['weights']}`" if w["weights"] else UNDEFINED,
             f"`{w['sha256'][:16]}`" if w["sha256"] else UNDEFINED, w["where"],
             f"**{w['status'].upper()}**" if w["warning"] else w["status"]] for w in card["weights"]]
    return ["", "## Weights provenance", ""] + _table(["backbone", "weights", "sha256", "recorded in", "status"], rows)


def _data_lines(card: dict) -> list[str]:
    data = card["training_data"]
    lines = ["", "## Training data", "", f"- dataset: {data['dataset'] or UNDEFINED}"]
    lines += [f"- store `{st['path']}` ({st['dataset']}), manifest sha256 `{str(st['manifest_sha256'])[:12]}`"
              for st in data["stores"]]
    lines.append("- images: " + (", ".join(f"{s} {n}" for s, n in data["images"].items()) or UNDEFINED))
    splits = list(data["prevalence"])
    if splits:
        lines += ["", "Positives / scored images (prevalence) per class:", ""]
        rows = [[n] + [f"{p[n]['positives']} / {p[n]['scored']} ({_percent(p[n]['prevalence'])})" if n in p
                       else UNDEFINED for p in data["prevalence"].values()] for n in data["labels"]]
        lines += _table(["label", *splits], rows)
    return lines


def _test_lines(card: dict) -> list[str]:
    t = card["test"]
    if t is None:
        return ["", "## Test metrics", "", "No split was scored."]
    b, low, high = t.get("bootstrap"), t["mean_auroc_ci_low"], t["mean_auroc_ci_high"]
    if defined(low) and defined(high):
        how = f", 95% CI {low:.3f}-{high:.3f} ({b['unit']}-level bootstrap, {b['draws']} draws)"
    else:
        how = ", no interval" + ("" if b else " (bootstrap off)")
    lines = ["", f"## Test metrics ({t['split']} split, {t['n']} images)", "",
             f"- {averaged(list(t['per_class']))} {number(t['mean_auroc'])}{how}"]
    if "mean_auprc" in t and t["mean_auprc"] is not None:
        lines.append(f"- {averaged(list(t['per_class']), 'AUPRC')} {number(t['mean_auprc'])} (a class's chance level "
                     "is its prevalence)")
    has_auprc = any("auprc" in e for e in t["per_class"].values())
    header = ["label", "positives / negatives", "prevalence", "AUROC (95% CI)"] + (["AUPRC"] if has_auprc else [])
    rows = []
    for name, e in t["per_class"].items():
        prevalence = e.get("prevalence", e["n_pos"] / (e["n_pos"] + e["n_neg"]) if e["n_pos"] + e["n_neg"] else None)
        rows.append([name, f"{e['n_pos']} / {e['n_neg']}", _percent(prevalence), entry_with_interval(e, "auroc")]
                    + ([number(e.get("auprc"))] if has_auprc else []))
    return lines + [""] + _table(header, rows)


def _calibration_lines(card: dict) -> list[str]:
    c = card["calibration"]
    lines = ["", "## Calibration", ""]
    if c is None:
        return lines + ["Not measured in this run: whether a probability of 0.7 means 70% is unknown."]
    ece = c.get("ece") or {}
    # One label pooled is that label: named as itself.
    pooled = next(iter(ece.get("per_class") or {})) if len(ece.get("per_class") or {}) == 1 else "pooled"
    if ece:
        lines.append(f"- expected calibration error ({c.get('bins', UNDEFINED)} bins, {card['test']['split']}): "
                     f"{pooled} {number(ece.get('pooled'))}")
    after = c.get("ece_temperature") or {}
    if after:
        lines.append(f"- after temperature scaling: {pooled} {number(after.get('pooled'))}")
    if c.get("temperature"):
        lines.append(f"- temperature scaling fitted on {c.get('temperature_fitted_on') or 'val'}: the service and "
                     "heads.predict give calibrated probabilities (predictions files keep the raw ones); T per class: "
                     + ", ".join(f"{n} {number(t, 2)}" for n, t in c["temperature"].items()))
    else:
        lines.append("- no temperature fitted: probabilities are the model's raw ones")
    return lines


def _subgroup_lines(card: dict) -> list[str]:
    gaps = card["subgroup_gaps"]
    lines = ["", "## Subgroups", ""]
    if gaps is None:
        return lines + ["No subgroup breakdown in this run (its predictions carry no sex, age, view or source)."]
    if not gaps:
        return lines + ["No class was scored in two groups of one attribute (too few images per group)."]
    overlap = {True: "yes (within the bootstrap's spread)", False: "no", None: UNDEFINED}
    rows = [[n, g["attribute"], " vs ".join(f"{group} ({number(a)})" for group, a in
                                            zip(g["groups"], g.get("aurocs") or [None, None])),
             number(g["gap"]), overlap[g.get("intervals_overlap")]] for n, g in gaps.items()]
    return lines + ["Largest AUROC gap per class between two scored groups of one attribute (report.md has every "
                    "group):", ""] + _table(["label", "attribute", "groups (AUROC)", "gap", "intervals overlap"],
                                            rows)


def card_markdown(card: dict) -> str:
    """model_card.md: the card's sections, warnings first in bold."""
    run, model, th = card["run"], card["model"], card["thresholds"]
    lines = [f"# Model card: {run['name']}", "", f"> {card['notice']}", ""]
    lines += [line for w in card["warnings"] for line in (f"**WARNING: {w['text']}**", "")]
    lines += ["## Model", "", f"- {model['description']} (run kind {run['kind']}), finished {run['finished']}",
              f"- run directory `{run['path']}`"]
    if model.get("head"):
        lines.append(f"- head: {model['head']}")
    if model.get("file"):
        lines.append(f"- model file `{model['file']}`, sha256 `{model['sha256']}`")
    for m in model.get("members", []):
        lines.append(f"- member `{m['path']}` ({m['kind']}), test mean AUROC {number(m['test_mean_auc'])}")
    lines += _weights_lines(card) + _data_lines(card)
    lines += ["", "## Thresholds", "", f"- {th['rule']}"]
    if th["fallback_0.5"]:
        lines.append(f"- 0.5 fallback, not chosen (val had no positive): {', '.join(th['fallback_0.5'])}")
    lines += _test_lines(card) + _calibration_lines(card) + _subgroup_lines(card)
    lines += ["", "## Intended use", "", card["intended_use"], "", card["notice"]]
    return "\n".join(lines) + "\n"


def write_card(run: str | Path) -> Path:
    """Write model_card.md and model_card.json into run directory `run`; returns the .md."""
    run = Path(run)
    card = build_card(run)
    rundir.write_json(run / rundir.MODEL_CARD_JSON, card)
    path = run / rundir.MODEL_CARD
    path.write_text(card_markdown(card))
    return path
