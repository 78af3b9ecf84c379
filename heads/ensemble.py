"""An ensemble of finished runs (heads, fine-tunes, evaluations, other ensembles) over the same images.

    python -m heads.ensemble runs/a runs/b runs/c --out runs/ensemble-abc [--combine logit]

Each member's saved predictions (predictions/val.parquet and test.parquet) are combined per image and
label: the mean probability (default) or the sigmoid of the mean logit. The members must share their
label names, the images of each split and the ground truth of every image: otherwise the ensemble is
refused with one line naming the member. The result is a run directory of kind "ensemble" with the
metrics any run has (thresholds chosen on val, val and test AUROC with patient-level intervals where
the members' stores give patients), its predictions, config.json and report.md, so `cxr compare`
sets it beside its members.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

from common.evaluation.age_bands import AGE_BANDS, parse_age_bands
from common.evaluation.age_bands import add_flag as add_age_bands_flag
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, MIN_VALID_DRAWS, check_draws
from common.config import HelpFormatter, log, parse_with_config, require, settings_of
from common.runs.command import command_line, run_command

PROG = "python -m heads.ensemble"
KIND = "ensemble"
COMBINE = ("prob", "logit")
SPLITS = ("val", "test")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="*", help="finished run directories (two or more)")
    p.add_argument("--config", help="TOML file whose [ensemble] table sets defaults for these flags")
    p.add_argument("--combine", default="prob", choices=COMBINE,
                   help="prob: mean probability; logit: sigmoid of the mean logit")
    p.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS,
                   help=f"patient-level bootstrap draws for the AUROC 95%% intervals; 0: none, else at least "
                        f"{MIN_VALID_DRAWS}")
    add_age_bands_flag(p)
    p.add_argument("--out", help="run directory to write (kind ensemble)")
    p.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --out")
    return p


@dataclass(frozen=True)
class EnsembleSettings:
    """One field per flag (--config aside); the defaults live in the parser."""

    runs: tuple[str, ...]
    combine: str
    bootstrap_draws: int
    age_bands: tuple[float, ...]
    out: str
    overwrite: bool


def settings_from(args: argparse.Namespace) -> EnsembleSettings:
    require(args, "out")
    check_draws(args.bootstrap_draws)
    age_bands = parse_age_bands(args.age_bands)
    return replace(settings_of(EnsembleSettings, args), age_bands=age_bands)


def load_members(paths: list[str]) -> tuple[list[str], dict, list[dict]]:
    """(label names, split -> [member frames], member records), refused in one line unless every member
    has the first one's labels, images and ground truth."""
    import pandas as pd

    from common.runs import rundir

    if len(paths) < 2:
        raise ValueError(f"an ensemble needs two or more runs, {len(paths)} given")
    frames: dict[str, list] = {s: [] for s in SPLITS}
    members, names, seen = [], None, {}
    for i, path in enumerate(paths):
        run = Path(path)
        first = seen.setdefault(run.resolve(), i)
        if first != i:
            raise ValueError(f"{path}: the same run as {paths[first]}; an ensemble needs two or more different runs")
        marker = rundir.read_marker(run) if run.is_dir() else None
        if marker is None:
            raise ValueError(f"{path}: not a run directory (no {rundir.MARKER})")
        metrics = rundir.read_json(run / rundir.METRICS)
        labels = list(metrics["label_names"])
        if names is None:
            names = labels
        elif labels != names:
            raise ValueError(f"{path}: labels {', '.join(labels)} are not the first run's ({', '.join(names)})")
        for split in SPLITS:
            file = run / rundir.PREDICTIONS / f"{split}.parquet"
            if not file.is_file():
                raise ValueError(f"{path}: no {split} predictions ({file})")
            frame = pd.read_parquet(file).sort_values("image_id", kind="stable").reset_index(drop=True)
            if frames[split]:
                _check_same_images(frames[split][0], frame, names, split, path, paths[0])
            frames[split].append(frame)
        config = rundir.read_json(run / rundir.CONFIG) if (run / rundir.CONFIG).is_file() else {}
        test = metrics.get("splits", {}).get("test", {}).get("summary", {})
        members.append({"path": str(run.resolve()), "kind": marker.get("kind"), "test_mean_auc": test.get("mean_auc"),
                        "stores": config.get("stores"), "dataset": config.get("dataset")})
    return names, frames, members


def _check_same_images(first, frame, names: list[str], split: str, path: str, first_path: str) -> None:
    import numpy as np

    from common.runs.rundir import TARGET_PREFIX

    if len(frame) != len(first) or not np.array_equal(frame["image_id"].to_numpy(), first["image_id"].to_numpy()):
        raise ValueError(f"{path}: its {split} images are not those of {first_path} ({len(frame)} vs {len(first)} "
                         "images); an ensemble combines predictions of the same images")
    truth = [TARGET_PREFIX + n for n in names]
    if not np.array_equal(frame[truth].to_numpy(), first[truth].to_numpy()):
        raise ValueError(f"{path}: its {split} ground truth differs from {first_path}'s for the same images")


def combine(probs: list, how: str):
    """Members' (n, labels) probabilities -> the ensemble's (common.evaluation.scores.combine_probabilities)."""
    from common.evaluation.scores import combine_probabilities

    return combine_probabilities(probs, how)


def _patients(members: list[dict], split: str, image_ids):
    """Patient per image from the first member's store (head runs record theirs); None otherwise."""
    import numpy as np

    from common.features.store import StoreError, data_files, read_manifest, read_parquet

    for member in members:
        for store in member.get("stores") or []:
            try:
                files = data_files(store["path"], split, read_manifest(store["path"]))
            except StoreError:
                files = None  # the store is gone or changed since: no patients from it
            if files:
                table = read_parquet(files, ["image_id", "patient_id"]).to_pandas()
                mapping = dict(zip(table["image_id"], table["patient_id"]))
                found = [mapping.get(i) for i in image_ids]
                if all(p is not None for p in found):
                    return np.asarray(found, dtype=object)
    return None


def _same(a, b) -> bool:
    """Two columns equal row by row, unknowns (None, NaN) only where both are unknown."""
    import numpy as np
    import pandas as pd

    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    unknown = pd.isna(a)
    return bool(np.array_equal(unknown, pd.isna(b)) and (a[~unknown] == b[~unknown]).all())


def _who(arrays: list[dict], members: list[dict], split: str):
    """(patient ids, groups) of a split from the members' predictions files: the first member's that has
    them, refused in one line where another member's disagree; None where no member's file has them (runs
    from before they were recorded)."""
    from common.runs.rundir import GROUP_COLUMNS

    first = {}  # column -> (values, path) of the first member whose file has it
    for a, member in zip(arrays, members):
        columns = {**({"patient_id": a["patient_id"]} if a["patient_id"] is not None else {}), **(a["groups"] or {})}
        for column, values in columns.items():
            if column not in first:
                first[column] = (values, member["path"])
            elif not _same(first[column][0], values):
                raise ValueError(f"{member['path']}: its {split} {column} column differs from {first[column][1]}'s "
                                 "for the same images; an ensemble's members describe the same images alike")
    patients = first["patient_id"][0] if "patient_id" in first else None
    groups = {c: first[c][0] for c in GROUP_COLUMNS} if all(c in first for c in GROUP_COLUMNS) else None
    return patients, groups


def build(names, frames, members, how: str, out: Path, bootstrap_draws: int, age_bands=AGE_BANDS) -> dict:
    """metrics.json's content; predictions written into `out`."""
    from common.evaluation.scores import SplitScores, evaluate_splits
    from common.evaluation.studies import study_ids
    from common.runs.rundir import predictions_arrays

    scores, notes = {}, []
    dataset = members[0].get("dataset") or next((s.get("dataset") for s in members[0].get("stores") or []), None)
    for split in SPLITS:
        arrays = [predictions_arrays(f, names) for f in frames[split]]
        first = arrays[0]
        patients, groups = _who(arrays, members, split)
        if patients is None:  # runs from before predictions files held patients: their stores may
            patients = _patients(members, split, first["image_id"])
        if patients is None and bootstrap_draws:
            notes.append(f"{split}: AUROC intervals resample images (no member store gives patients)")
        scores[split] = SplitScores(first["image_id"], combine([a["probs"] for a in arrays], how), first["y"],
                                    first["mask"], first["has_disease"], first["no_finding"], patients,
                                    study_ids(dataset, first["image_id"]) if dataset else None, groups)
    splits, thresholds, threshold_notes = evaluate_splits(scores, names, out, bootstrap_draws, age_bands=age_bands)
    return {"label_names": names, "combine": how, "members": members,
            "thresholds": dict(zip(names, thresholds.tolist())), "splits": splits,
            "notes": notes + threshold_notes + [n for m in splits.values() for n in m["notes"]]}


def render_report(metrics: dict) -> str:
    from common.evaluation import calibration, operating_points, subgroups
    from common.evaluation.model_card import threshold_fallbacks
    from common.evaluation.report import shown_notes
    from common.evaluation.text import averaged, entry_with_interval, number

    names, fallbacks = metrics["label_names"], threshold_fallbacks(metrics)
    auroc = averaged(names)  # a binary task's one AUROC, not a mean over one class
    lines = [f"# Ensemble of {len(metrics['members'])} runs ({metrics['combine']} mean)", "",
             "Model card (training data, weights provenance, warnings, intended use): [model_card.md](model_card.md)",
             "", f"| member | kind | test {auroc} |", "| --- | --- | --- |"]
    lines += [f"| `{m['path']}` | {m['kind']} | {number(m['test_mean_auc'])} |" for m in metrics["members"]]
    for split, m in metrics["splits"].items():
        lines += ["", f"## {split}: {m['n']} images, {auroc} {entry_with_interval(m['summary'], 'mean_auc')}", "",
                  "| class | AUROC (95% CI) | threshold (chosen on val) |", "| --- | --- | --- |"]
        lines += [f"| {n} | {entry_with_interval(m['per_class'][n], 'auroc')} | {number(metrics['thresholds'][n])}"
                  + (" (0.5 fallback: no val positive)" if n in fallbacks else "") + " |" for n in names]
    lines += calibration.report_lines(metrics, None) + operating_points.report_lines(metrics)
    lines += subgroups.report_lines(metrics)
    if notes := shown_notes(metrics):
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Write an ensemble run from these flags; bad input raises (cli turns it into the one-line exit)."""
    args = settings_from(parse_with_config(build_parser(prog), argv, "ensemble"))

    from common.evaluation.model_card import write_card
    from common.runs import rundir

    command = command_line(prog, argv)
    started = dt.datetime.now(dt.timezone.utc)
    names, frames, members = load_members(list(args.runs))  # every refusal before --out is touched

    def write(out: Path) -> dict:
        metrics = build(names, frames, members, args.combine, out, args.bootstrap_draws, args.age_bands)
        config = {"kind": KIND, "settings": {"combine": args.combine, "members": [m["path"] for m in members],
                                             "bootstrap_draws": args.bootstrap_draws,
                                             "age_bands": list(args.age_bands)},
                  "dataset": members[0].get("dataset"), "stores": members[0].get("stores") or [],
                  "label_names": names, "command": command, "started": started.isoformat(timespec="seconds"),
                  "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        rundir.write_json(out / rundir.CONFIG, config)
        rundir.write_json(out / rundir.METRICS, metrics)
        (out / rundir.REPORT).write_text(render_report(metrics))
        write_card(out)
        summary = {"out": str(out), **{f"{k}_mean_auc": v["summary"]["mean_auc"] for k, v in metrics["splits"].items()}}
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
        return summary

    return rundir.write_run(args.out, args.overwrite, KIND, write, log, inputs=args.runs)


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
