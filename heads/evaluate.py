"""Score a trained model on data it was not trained on: a head on any feature store, or a head or
fine-tune run on another labelled table of image files (another hospital), through the alias table.

    python -m heads.evaluate --run runs/nih-resnet50-mlp3 --store stores/chexpert-resnet50 --out runs/nih-on-chexpert
    python -m heads.evaluate --run runs/tb-finetune --dataset table --metadata other.csv --images other/ \
        --path-column file --patient-column patient --label-columns Tuberculosis --out runs/tb-on-other

A store must hold the head's features (same backbone, weights, data config: heads.predict's check);
image files go through the run's own model and data config (heads/scoring.py), every image of the
table scored as its test split, an unreadable one an error row (errors.csv), counted. Labels are
paired with the model's through common/data/labels.py (CheXpert "Pleural Effusion" is NIH
"Effusion"); a model label the data lacks is listed as not scored, never scored against zeros, and
uncertain (-1) labels are left out of their class. --out becomes a run directory of kind
"evaluation": metrics.json, predictions/, config.json and report.md.
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
from common.evaluation.text import averaged, entry_with_interval
from common.config import ConfigError, HelpFormatter, log, parse_with_config, require, settings_of
from common.data.table_flags import MAPPING_KEYS, add_table_flags, check_table_flags
from common.features.store import SPLITS
from common.images.decode import MAX_PIXELS
from common.runs.command import command_line, run_command
from heads.choices import PRECISIONS

# torch, pandas and scikit-learn come with the scoring below, once the flags are good.

PROG = "python -m heads.evaluate"
KIND = "evaluation"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file whose [evaluate] table sets defaults for these flags")
    p.add_argument("--run", help="run directory (or its head.pt) written by heads.train; with --images also a "
                                 "fine-tune run")
    p.add_argument("--store", nargs="+", help="feature store(s) to score on, fused as at training (default: the head's own)")
    p.add_argument("--split", nargs="+", default=["test"], choices=SPLITS, help="store splits to score")
    p.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS,
                   help=f"patient-level bootstrap draws for the AUROC 95%% intervals (seed 0); 0: none, else at least "
                        f"{MIN_VALID_DRAWS}")
    add_age_bands_flag(p)
    add_operating_point_flag(p)  # chosen on the head run's val predictions
    p.add_argument("--precision", default="auto", help=" | ".join(PRECISIONS))
    images = p.add_argument_group("another labelled table of image files (instead of --store; a head or fine-tune "
                                  "run; every image scored as the test split)")
    add_table_flags(images, splits=False)
    images.add_argument("--device", default="cpu", help="with --images: cpu or cuda[:N]")
    images.add_argument("--batch-size", type=int, default=32, help="with --images: images per model batch")
    images.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="with --images: an image with more pixels (from its header) is an error row, undecoded")
    images.add_argument("--threads", type=int, default=None, help="with --images: torch intra-op threads")
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
    # --images: another labelled table (common.data.table_flags without its split flags)
    dataset: str
    metadata: str | None
    images: str | None
    keep_laterals: bool
    limit: int | None
    table_mapping: str | None
    path_column: str | None
    patient_column: str | None
    image_id_column: str | None
    view_column: str | None
    age_column: str | None
    sex_column: str | None
    label_columns: str | None
    findings_column: str | None
    findings_separator: str | None
    label_names: str | None
    no_finding: str | None
    blank_label: int | None
    label_key: str | None
    label_table: str | None
    header_workers: int | None
    device: str
    batch_size: int
    max_pixels: int
    threads: int | None
    out: str
    overwrite: bool


# The flags of the --images route: refused without --images, never silently ignored.
_TABLE_FLAGS = ("metadata", "keep_laterals", "limit", "table_mapping", "label_table", "header_workers", "threads",
                *(k.replace("-", "_") for k in MAPPING_KEYS))


def _check_images_route(args: argparse.Namespace) -> None:
    if not args.images:
        given = [f for f in _TABLE_FLAGS if getattr(args, f, None) not in (None, False)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')}: only with --images (scoring on image files)")
        return
    if args.store:
        raise ConfigError("--store and --images: score on one or the other")
    if list(args.split) != ["test"]:
        raise ConfigError("--split: not with --images (every image of the table is scored, as the test split)")
    check_table_flags(args)
    for flag in ("batch_size", "max_pixels"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")


def settings_from(args: argparse.Namespace) -> EvaluateSettings:
    require(args, "run", "out")
    _check_images_route(args)
    check_draws(args.bootstrap_draws)
    age_bands = parse_age_bands(args.age_bands)
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision {args.precision!r}: choose from {', '.join(PRECISIONS)}")
    return replace(settings_of(EvaluateSettings, args), age_bands=age_bands,
                   operating_point=parse_targets(args.operating_point))


def load_checked(args: EvaluateSettings):
    """What is scored on what, every refusal made before --out is touched: for a store, the head, the
    store paths and the label pairs (features not the head's: heads.predict's check); for image files,
    the run's model, the other table and the label pairs; no shared label."""
    from heads.scoring import load_run_model, pair_labels, read_labelled_table

    if args.images:
        table = read_labelled_table(args, log)
        model = load_run_model(args.run, args.device, args.precision, args.threads, log)
        where = f"--metadata {args.metadata}" if args.metadata else f"--images {args.images}"
        return model, table, pair_labels(model.label_names, model.dataset, list(table.label_names), table.dataset, where)
    from common.runs import rundir
    from heads.checkpoint import load_head
    from heads.data import store_info
    from heads.predictions import check_stores

    if Path(args.run).is_dir() and (rundir.read_marker(Path(args.run)) or {}).get("kind") == "finetune":
        raise ConfigError(f"--run {args.run}: a fine-tune run has no store; score it on image files (--metadata, "
                          "--images)")
    head = load_head(args.run)
    paths = args.store or [s["path"] for s in head.stores]
    check_stores(head, paths)  # same backbone, weights, feature width, data config, view
    manifest = store_info(paths[0]).manifest
    return head, paths, pair_labels(head.label_names, head.dataset, manifest["label_names"], str(manifest["dataset"]),
                                    f"--store {paths[0]}")


def score_split(head, split, store_names, pairs, dataset: str, precision: str, source: str | None = None):
    """One split's probabilities and relabelled ground truth, as a SplitScores on the paired labels, with
    who each image is (its store's `source`) for the subgroup metrics."""
    from common.evaluation.subgroups import image_groups
    from heads.predictions import probabilities
    from heads.scoring import paired_scores

    columns = [head.label_names.index(h) for h, _ in pairs]
    probs = probabilities(head, split.features, split.age, split.sex, precision)[:, columns]
    return paired_scores(probs, split.labels, store_names, pairs, dataset, head.dataset, split.image_id,
                         split.patient_id, image_groups(len(split), split.sex, split.age, split.view, source))


def _scored(splits: dict, pairs, thresholds, out: Path, bootstrap_draws: int, age_bands, run_dir: Path | None,
            targets) -> tuple[dict, list[str]]:
    """Every metric of each split's SplitScores: thresholds, operating points and calibration all the
    run's own, chosen and fitted on its val; the data here is only scored."""
    from common.evaluation import operating_points
    from common.evaluation.calibration import read_calibration, temperatures
    from common.evaluation.scores import score_splits

    names = [h for h, _ in pairs]
    points, notes = operating_points.from_run(run_dir, names, targets) if run_dir else (None, [])
    calibration = read_calibration(run_dir) if run_dir else None
    scored = score_splits(splits, names, thresholds, out, bootstrap_draws,
                          temperature=temperatures(calibration, names) if calibration else None, points=points,
                          age_bands=age_bands)
    return scored, notes + [n for m in scored.values() for n in m["notes"]]


def _paired_record(model_names, model_dataset: str, data_names, data_dataset: str, pairs, thresholds) -> dict:
    names = [h for h, _ in pairs]
    paired = {b for _, b in pairs}
    return {"label_names": names, "head_dataset": model_dataset, "store_dataset": data_dataset,
            "aliases": [list(p) for p in pairs], "not_scored": [h for h in model_names if h not in names],
            "store_labels_unused": [b for b in data_names if b not in paired],
            "thresholds": dict(zip(names, (float(t) for t in thresholds)))}


def evaluate_store(head, paths: list[str], pairs, splits: list[str], precision: str, bootstrap_draws: int,
                   out: Path, age_bands=AGE_BANDS, head_run: Path | None = None, targets=DEFAULT_TARGETS) -> dict:
    """metrics.json's content, with predictions/<split>.parquet written into `out`. The head run's own
    val (`head_run`) chose the thresholds and operating points and fitted any calibration: this store
    is only scored."""
    from common.evaluation.subgroups import source_name
    from heads.data import open_stores

    stores = open_stores(paths, splits)
    store_names = list(stores.label_names)
    thresholds = head.thresholds[[head.label_names.index(h) for h, _ in pairs]]  # chosen on the head's own val
    source = source_name(stores.infos[0].manifest["dataset"], stores.infos[0].manifest.get("config"))
    scores = {name: score_split(head, split, store_names, pairs, stores.dataset, precision, source)
              for name, split in stores.splits.items()}
    scored, notes = _scored(scores, pairs, thresholds, out, bootstrap_draws, age_bands, head_run, targets)
    return {**_paired_record(head.label_names, head.dataset, store_names, stores.dataset, pairs, thresholds),
            "splits": scored, "notes": notes}


def evaluate_images(model, table, pairs, args: EvaluateSettings, out: Path) -> dict:
    """metrics.json's content for a run scored on another table's image files (heads/scoring.py), with
    predictions/test.parquet and, where images could not be scored, errors.csv written into `out`."""
    from common.runs import rundir
    from heads.scoring import IMAGES_SPLIT, image_scores

    source = _source(table, args)
    log(f"scoring {len(table.table)} images of {source} with the {model.kind} run {model.run}")
    scores, failed = image_scores(model, table, pairs, source, args.batch_size, args.max_pixels, log)
    if len(failed):
        rundir.write_table(failed, out / rundir.ERRORS)
    thresholds = model.thresholds[[model.label_names.index(h) for h, _ in pairs]]  # chosen on the run's own val
    scored, notes = _scored({IMAGES_SPLIT: scores}, pairs, thresholds, out, args.bootstrap_draws, args.age_bands,
                            model.run, args.operating_point)
    unreadable = ([f"{len(failed)} of {len(table.table)} images could not be scored and are left out "
                   f"({rundir.ERRORS}), e.g. {failed['image_id'].iloc[0]}: {failed['error'].iloc[0]}"]
                  if len(failed) else [])
    return {**_paired_record(model.label_names, model.dataset, list(table.label_names), table.dataset, pairs,
                             thresholds),
            "splits": scored, "images": {"table": table.counts, "scored": len(scores.image_id),
                                         "unreadable": len(failed)},
            "notes": unreadable + notes}


def scored_counts(metrics: dict) -> dict[str, int]:
    """Per split, the paired classes that got an AUROC and those that could not (no positives or no
    negatives in the store's split): a class paired but unscorable is never counted as scored."""
    from common.evaluation.text import defined

    counts = {}
    for split, m in metrics["splits"].items():
        scored = sum(defined(m["per_class"][n]["auroc"]) for n in metrics["label_names"])
        counts[f"{split}_scored"], counts[f"{split}_unscorable"] = scored, len(metrics["label_names"]) - scored
    return counts


def _source_lines(config: dict, metrics: dict) -> list[str]:
    """The report's title and what was scored on what: a head on stores, or a run on a table's image files."""
    table = config.get("table")
    if table is None:
        return [f"# {metrics['head_dataset']} head scored on a {metrics['store_dataset']} store", "",
                f"- head: `{config['head_run']}`", *[f"- store: `{s['path']}`" for s in config.get("stores", [])]]
    images = metrics["images"]
    return [f"# {metrics['head_dataset']} {config.get('model_kind', 'head')} run scored on {table['source']}", "",
            f"- run: `{config['head_run']}` ({config.get('model_kind', 'head')}), each image through its own model "
            "and data config",
            f"- table: `{table['metadata'] or table['images']}`, images under `{table['images']}` "
            f"({table['dataset']}); every image scored as the test split",
            f"- images: {images['scored']} scored, {images['unreadable']} could not be scored"
            + (" (errors.csv)" if images["unreadable"] else "")]


def render_report(config: dict, metrics: dict) -> str:
    """A short report.md: what was scored on what, the pairs, per-class AUROC per split."""
    store_of = dict(map(tuple, metrics["aliases"]))
    counts = scored_counts(metrics)
    lines = [*_source_lines(config, metrics),
             f"- labels paired: {len(metrics['label_names'])} shared (common/data/labels.py aliases); "
             "uncertain labels left out of their class",
             *[f"- {split}: {counts[f'{split}_scored']} of them scored (an AUROC), "
               f"{counts[f'{split}_unscorable']} unscorable (no positives or no negatives here)"
               for split in metrics["splits"]],
             f"- not scored (the data has no such label): {', '.join(metrics['not_scored']) or 'none'}",
             f"- data labels the model does not predict: {', '.join(metrics['store_labels_unused']) or 'none'}",
             "- thresholds, operating points and any calibration: the run's own, chosen on its training data's val "
             "split", ""]
    for split, m in metrics["splits"].items():
        lines += [f"## {split}: {m['n']} images", "", "| class | data label | positives / negatives | AUROC (95% CI) |",
                  "| --- | --- | --- | --- |"]
        for name in metrics["label_names"]:
            e = m["per_class"][name]
            lines.append(f"| {name} | {store_of[name]} | {e['n_pos']} / {e['n_neg']} | {entry_with_interval(e, 'auroc')} |")
        if len(metrics["label_names"]) > 1:  # one label is its own result: no mean row repeating it
            lines.append(f"| **mean** | | | {entry_with_interval(m['summary'], 'mean_auc')} |")
        if "study_level" in m:
            lines += ["", f"Per study ({m['study_level']['studies']} studies): {averaged(metrics['label_names'])} "
                          f"{entry_with_interval(m['study_level'], 'mean_auc')}."]
        lines.append("")
    from common.evaluation.subgroups import report_lines

    if subgroups := report_lines(metrics):
        lines += [*subgroups[1:], ""]  # its leading blank line: the split's table already ends with one
    from common.evaluation import calibration, operating_points

    lines += [*calibration.report_lines(metrics, None), *operating_points.report_lines(metrics), ""]
    from common.evaluation.report import shown_notes

    if notes := shown_notes(metrics):
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def _source(table, args: EvaluateSettings) -> str:
    from common.evaluation.subgroups import source_name

    return source_name(table.dataset, {"metadata": args.metadata, "images": args.images})


def run(args: EvaluateSettings, checked, out: Path, command: str) -> dict:
    from common import software
    from common.runs import rundir
    from heads.data import store_info
    from heads.fit import resolve_precision

    started = dt.datetime.now(dt.timezone.utc)
    precision = resolve_precision(args.precision)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    head_config = rundir.read_json(run_dir / rundir.CONFIG) if (run_dir / rundir.CONFIG).is_file() else {}
    if args.images:
        model, table, pairs = checked
        metrics = evaluate_images(model, table, pairs, args, out)
        scored_on = {"model_kind": model.kind, **model.describe(),
                     "table": {"dataset": table.dataset, "metadata": args.metadata, "images": args.images,
                               "source": _source(table, args), "counts": table.counts}}
    else:
        head, paths, pairs = checked
        metrics = evaluate_store(head, paths, pairs, args.split, precision, args.bootstrap_draws, out, args.age_bands,
                                 run_dir, args.operating_point)
        scored_on = {"stores": [store_info(p).describe() for p in paths]}
    config = {
        "kind": KIND,
        # What `cxr compare` sets beside the run's own: its training settings, then how it was scored.
        "settings": {**head_config.get("settings", {}), "head_run": str(run_dir.resolve()), "split": list(args.split),
                     "bootstrap_draws": args.bootstrap_draws, "age_bands": list(args.age_bands),
                     **({"scored_on": args.metadata or args.images} if args.images else {})},
        "head_run": str(run_dir.resolve()),
        **scored_on,
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
    """Score a run on a store or image files from these flags; bad input raises (cli turns it into the one-line
    exit)."""
    settings = settings_from(parse_with_config(build_parser(prog), argv, "evaluate"))

    from common.runs import rundir

    command = command_line(prog, argv)
    checked = load_checked(settings)  # every refusal before --out is touched
    return rundir.write_run(settings.out, settings.overwrite, KIND, lambda out: run(settings, checked, out, command),
                            log, inputs=[settings.run, *(settings.store or []),
                                         *(p for p in (settings.metadata, settings.images) if p)])


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
