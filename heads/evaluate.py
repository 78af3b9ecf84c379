"""Score a trained head on any feature store, also one of another dataset, through the alias table.

    python -m heads.evaluate --run runs/nih-resnet50-mlp3 --store stores/chexpert-resnet50 --out runs/nih-on-chexpert

The store must hold the head's features (same backbone, weights, data config: heads.predict's
check). Its labels are paired with the head's through common/data/labels.py (CheXpert "Pleural Effusion"
is NIH "Effusion"); a head label the store lacks is listed as not scored, never scored against
zeros, and uncertain (-1) labels are left out of their class. --out becomes a run directory of kind
"evaluation": metrics.json (the head run's split structure, on the shared labels), predictions/,
config.json and report.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

from common.evaluation.age_bands import AGE_BANDS, parse_age_bands
from common.evaluation.age_bands import add_flag as add_age_bands_flag
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, MIN_VALID_DRAWS, check_draws
from common.evaluation.operating_points import DEFAULT_TARGETS, parse_targets
from common.evaluation.operating_points import add_flag as add_operating_point_flag
from common.config import ConfigError, HelpFormatter, log, parse_with_config, require, settings_of
from common.features.store import SPLITS
from common.runs.command import command_line, run_command
from heads.choices import PRECISIONS

# torch, pandas and scikit-learn come with the scoring below, once the flags are good.

PROG = "python -m heads.evaluate"
KIND = "evaluation"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file whose [evaluate] table sets defaults for these flags")
    p.add_argument("--run", help="run directory (or its head.pt) written by heads.train")
    p.add_argument("--store", nargs="+", help="feature store(s) to score on, fused as at training (default: the head's own)")
    p.add_argument("--split", nargs="+", default=["test"], choices=SPLITS, help="store splits to score")
    p.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS,
                   help=f"patient-level bootstrap draws for the AUROC 95%% intervals (seed 0); 0: none, else at least "
                        f"{MIN_VALID_DRAWS}")
    add_age_bands_flag(p)
    add_operating_point_flag(p)  # chosen on the head run's val predictions
    p.add_argument("--precision", default="auto", help=" | ".join(PRECISIONS))
    p.add_argument("--out", help="run directory to write (kind evaluation)")
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation already in --out")
    return p


@dataclass(frozen=True)
class EvaluateSettings:
    """One field per flag (--config aside); the defaults live in the parser."""

    run: str
    store: tuple[str, ...] | None
    split: tuple[str, ...]
    bootstrap_draws: int
    age_bands: tuple[float, ...]
    operating_point: tuple[str, ...]
    precision: str
    out: str
    overwrite: bool


def settings_from(args: argparse.Namespace) -> EvaluateSettings:
    require(args, "run", "out")
    check_draws(args.bootstrap_draws)
    age_bands = parse_age_bands(args.age_bands)
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision {args.precision!r}: choose from {', '.join(PRECISIONS)}")
    return replace(settings_of(EvaluateSettings, args), age_bands=age_bands,
                   operating_point=parse_targets(args.operating_point))


def load_checked(args: EvaluateSettings):
    """The head, the store paths and the label pairs, every refusal made before --out is touched:
    features not the head's (heads.predict's check), no shared label."""
    from heads.checkpoint import load_head
    from heads.data import store_info
    from heads.predictions import check_stores

    head = load_head(args.run)
    paths = args.store or [s["path"] for s in head.stores]
    check_stores(head, paths)  # same backbone, weights, feature width, data config, view
    manifest = store_info(paths[0]).manifest
    return head, paths, pair_labels(head, manifest["label_names"], str(manifest["dataset"]), paths[0])


def pair_labels(head, store_names, store_dataset: str, where: str) -> list[tuple[str, str]]:
    """(head label, store label) pairs to score; a one-line error when there is none."""
    from common.data.labels import shared_labels
    from common.features.store import StoreError

    pairs = shared_labels(head.label_names, store_names, same_dataset=store_dataset == head.dataset)
    if not pairs:
        raise StoreError(f"--store {where}: no label of the head ({', '.join(head.label_names)}) is a label of this "
                         f"{store_dataset} store ({', '.join(store_names)}), even through common/data/labels.py's aliases")
    return pairs


def score_split(head, split, store_names, pairs, dataset: str, precision: str, source: str | None = None):
    """One split's probabilities and relabelled ground truth, as a SplitScores on the paired labels, with
    who each image is (its store's `source`) for the subgroup metrics."""
    import numpy as np

    from common.evaluation.scores import SplitScores
    from common.data.labels import relabel
    from common.evaluation.studies import study_ids
    from common.evaluation.subgroups import image_groups
    from common.data.targets import eval_targets, finding_flags
    from heads.predictions import probabilities

    names = [h for h, _ in pairs]
    columns = [head.label_names.index(h) for h in names]
    probs = probabilities(head, split.features, split.age, split.sex, precision)[:, columns]
    labels = relabel(split.labels, store_names, names, same_dataset=dataset == head.dataset)
    y, mask = eval_targets(labels.astype(np.int8))  # every column is paired: no NaN left
    has_disease, no_finding = finding_flags(split.labels, store_names)  # over the store's own disease labels
    return SplitScores(split.image_id, probs, y, mask, has_disease, no_finding, split.patient_id,
                       study_ids(dataset, split.image_id),
                       image_groups(len(split), split.sex, split.age, split.view, source))


def evaluate_store(head, paths: list[str], pairs, splits: list[str], precision: str, bootstrap_draws: int,
                   out: Path, age_bands=AGE_BANDS, head_run: Path | None = None, targets=DEFAULT_TARGETS) -> dict:
    """metrics.json's content, with predictions/<split>.parquet written into `out`. The head run's own
    val (`head_run`) chose the thresholds and operating points and fitted any calibration: this store
    is only scored."""
    import numpy as np

    from common.evaluation import operating_points
    from common.evaluation.calibration import read_calibration, temperatures
    from common.evaluation.scores import score_splits
    from common.evaluation.subgroups import source_name
    from heads.data import open_stores

    stores = open_stores(paths, splits)
    store_names = list(stores.label_names)
    names = [h for h, _ in pairs]
    thresholds = head.thresholds[[head.label_names.index(h) for h in names]]  # chosen on the head's own val
    source = source_name(stores.infos[0].manifest["dataset"], stores.infos[0].manifest.get("config"))
    points, notes = operating_points.from_run(head_run, names, targets) if head_run else (None, [])
    calibration = read_calibration(head_run) if head_run else None
    scored = score_splits({name: score_split(head, split, store_names, pairs, stores.dataset, precision, source)
                           for name, split in stores.splits.items()}, names, thresholds, out, bootstrap_draws,
                          temperature=temperatures(calibration, names) if calibration else None, points=points,
                          age_bands=age_bands)
    paired = {b for _, b in pairs}
    return {
        "label_names": names,
        "head_dataset": head.dataset,
        "store_dataset": stores.dataset,
        "aliases": [list(p) for p in pairs],
        "not_scored": [h for h in head.label_names if h not in names],
        "store_labels_unused": [b for b in store_names if b not in paired],
        "thresholds": dict(zip(names, np.asarray(thresholds, dtype=float))),
        "splits": scored,
        "notes": notes + [n for m in scored.values() for n in m["notes"]],
    }


def _cell(entry: dict, key: str = "auroc") -> str:
    from common.evaluation.text import entry_with_interval

    return entry_with_interval(entry, key)


def scored_counts(metrics: dict) -> dict[str, int]:
    """Per split, the paired classes that got an AUROC and those that could not (no positives or no
    negatives in the store's split): a class paired but unscorable is never counted as scored."""
    from common.evaluation.text import defined

    counts = {}
    for split, m in metrics["splits"].items():
        scored = sum(defined(m["per_class"][n]["auroc"]) for n in metrics["label_names"])
        counts[f"{split}_scored"], counts[f"{split}_unscorable"] = scored, len(metrics["label_names"]) - scored
    return counts


def render_report(config: dict, metrics: dict) -> str:
    """A short report.md: what was scored on what, the pairs, per-class AUROC per split."""
    store_of = dict(map(tuple, metrics["aliases"]))
    counts = scored_counts(metrics)
    lines = [f"# {metrics['head_dataset']} head scored on a {metrics['store_dataset']} store", "",
             f"- head: `{config['head_run']}`", *[f"- store: `{s['path']}`" for s in config["stores"]],
             f"- labels paired: {len(metrics['label_names'])} shared (common/data/labels.py aliases); "
             "uncertain labels left out of their class",
             *[f"- {split}: {counts[f'{split}_scored']} of them scored (an AUROC), "
               f"{counts[f'{split}_unscorable']} unscorable (no positives or no negatives here)"
               for split in metrics["splits"]],
             f"- not scored (the store has no such label): {', '.join(metrics['not_scored']) or 'none'}",
             f"- store labels the head does not predict: {', '.join(metrics['store_labels_unused']) or 'none'}",
             "- thresholds: the head's own, chosen on its training dataset's val split", ""]
    for split, m in metrics["splits"].items():
        lines += [f"## {split}: {m['n']} images", "", "| class | store label | positives / negatives | AUROC (95% CI) |",
                  "| --- | --- | --- | --- |"]
        for name in metrics["label_names"]:
            e = m["per_class"][name]
            lines.append(f"| {name} | {store_of[name]} | {e['n_pos']} / {e['n_neg']} | {_cell(e)} |")
        lines.append(f"| **mean** | | | {_cell(m['summary'], 'mean_auc')} |")
        if "study_level" in m:
            lines += ["", f"Per study ({m['study_level']['studies']} studies): mean AUROC "
                          f"{_cell(m['study_level'], 'mean_auc')}."]
        lines.append("")
    from common.evaluation.subgroups import report_lines

    if subgroups := report_lines(metrics):
        lines += [*subgroups[1:], ""]  # its leading blank line: the split's table already ends with one
    from common.evaluation import calibration, operating_points

    lines += [*calibration.report_lines(metrics, None), *operating_points.report_lines(metrics), ""]
    if metrics["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in metrics["notes"]], ""]
    return "\n".join(lines)


def run(args: EvaluateSettings, checked, out: Path, command: str) -> dict:
    from common import software
    from common.runs import rundir
    from heads.data import store_info
    from heads.fit import resolve_precision

    started = dt.datetime.now(dt.timezone.utc)
    head, paths, pairs = checked
    precision = resolve_precision(args.precision)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    metrics = evaluate_store(head, paths, pairs, args.split, precision, args.bootstrap_draws, out, args.age_bands,
                             run_dir, args.operating_point)
    head_config = rundir.read_json(run_dir / rundir.CONFIG) if (run_dir / rundir.CONFIG).is_file() else {}
    config = {
        "kind": KIND,
        # What `cxr compare` sets beside a head run's: the head's training settings, then how it was scored.
        "settings": {**head_config.get("settings", {}), "head_run": str(run_dir.resolve()), "split": list(args.split),
                     "bootstrap_draws": args.bootstrap_draws, "age_bands": list(args.age_bands)},
        "head_run": str(run_dir.resolve()),
        "stores": [store_info(p).describe() for p in paths],
        "label_names": metrics["label_names"],
        "precision_resolved": precision,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software("torch", "numpy", "scikit-learn"),
    }
    rundir.write_json(out / rundir.CONFIG, config)
    rundir.write_json(out / rundir.METRICS, metrics)
    (out / rundir.REPORT).write_text(render_report(config, metrics))
    summary = {"out": str(out), **{f"{k}_mean_auc": v["summary"]["mean_auc"] for k, v in metrics["splits"].items()},
               **scored_counts(metrics), "not_in_store": len(metrics["not_scored"])}
    log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Score a head on a store from these flags; bad input raises (cli turns it into the one-line exit)."""
    settings = settings_from(parse_with_config(build_parser(prog), argv, "evaluate"))

    from common.runs import rundir

    command = command_line(prog, argv)
    checked = load_checked(settings)  # every refusal before --out is touched
    return rundir.write_run(settings.out, settings.overwrite, KIND, lambda out: run(settings, checked, out, command),
                            log, inputs=[settings.run, *(settings.store or [])])


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
