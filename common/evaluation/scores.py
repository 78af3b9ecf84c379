"""A trained model's probabilities on val and test -> metrics and prediction files of a run.

Shared by heads.train (heads on stored features) and jobs/fine_tune.py (whole models on images),
so both runs have the same metrics.json splits and predictions/ files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.runs import rundir
from common.evaluation import operating_points
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS
from common.evaluation.calibration import fit_on_val, split_calibration, write_calibration
from common.data.targets import eval_targets, finding_flags, label_columns
from common.evaluation.metrics import choose_thresholds, evaluate, nanmean, per_class_auroc, study_level
from common.evaluation.studies import study_ids
from common.evaluation.age_bands import AGE_BANDS
from common.evaluation.subgroups import subgroup_metrics


@dataclass
class SplitScores:
    image_id: np.ndarray
    probs: np.ndarray  # (n, labels)
    y: np.ndarray  # (n, labels) 0/1
    mask: np.ndarray  # (n, labels) bool
    has_disease: np.ndarray  # (n,) bool, over all the dataset's disease labels (heads.data.finding_flags)
    no_finding: np.ndarray
    patient_id: np.ndarray | None = None  # (n,): the AUROC bootstrap's unit; None resamples images
    study_id: np.ndarray | None = None  # (n,): where a dataset has studies (CheXpert), also scored per study
    # Who each image is (rundir.GROUP_COLUMNS: sex, age, view, source; subgroups.image_groups), for the
    # predictions file and the subgroup metrics; None where unknown (a run from before they were recorded).
    groups: dict[str, np.ndarray] | None = None


def split_scores(image_id: np.ndarray, probs: np.ndarray, labels: np.ndarray, label_names, chosen: list[str],
                 patient_id: np.ndarray | None = None, dataset: str | None = None,
                 groups: dict[str, np.ndarray] | None = None) -> SplitScores:
    """One split's probabilities for the `chosen` labels against its raw labels (n, one column per
    `label_names`, the dataset's): scored on the raw targets whatever the training policy
    (common/data/targets.py), D-/N-AUC's finding flags over every disease label, not only the chosen,
    and per study where the dataset has studies."""
    y, mask = eval_targets(labels[:, label_columns(label_names, chosen)])
    return SplitScores(image_id, probs, y, mask, *finding_flags(labels, label_names), patient_id,
                       study_ids(dataset, image_id), groups)


def _front(s: SplitScores) -> dict:
    """The predictions file's columns after image_id: who each image is, as far as the split knows."""
    front = {} if s.patient_id is None else {"patient_id": np.asarray(s.patient_id, dtype=object)}
    return {**front, **(s.groups or {})}


def _add_subgroups(split: dict, s: SplitScores, name: str, label_names: list[str], bootstrap_draws: int,
                   age_bands) -> None:
    """Every AUROC by sex, age band, view and source (common/evaluation/subgroups.py), or a note why not."""
    if s.groups is None:
        split["notes"].append(f"{name}: no subgroups: the images' sex, age, view and source are not known here "
                              "(predictions from before they were recorded)")
        return
    split["subgroups"] = subgroup_metrics(s.y, s.probs, s.mask, label_names, s.groups, s.patient_id, age_bands,
                                          bootstrap_draws)


STUDY_RULE = "a study's score is the highest probability over its images; its label the one its images share"


def study_metrics(s: SplitScores, label_names: list[str]) -> dict:
    """AUROC per class over studies instead of images (the CheXpert paper's evaluation)."""
    y, probs, mask, disagree = study_level(s.study_id, s.y, s.probs, s.mask)
    auc, _ = per_class_auroc(y, probs, mask, label_names)
    per_class = {name: {"auroc": auc[c], "n_pos": int(((y[:, c] == 1) & mask[:, c]).sum()),
                        "n_neg": int(((y[:, c] == 0) & mask[:, c]).sum())} for c, name in enumerate(label_names)}
    return {"studies": len(y), "rule": STUDY_RULE, "label_disagreements": disagree, "mean_auc": nanmean(auc),
            "per_class": per_class}


def _add_operating_points(split: dict, s: SplitScores, label_names: list[str],
                          points: operating_points.OperatingPoints, bootstrap_draws: int) -> None:
    """The operating points of `points` scored on this split, into its per-class entries."""
    scored = operating_points.score(s.y, s.probs, s.mask, label_names, points, s.patient_id, bootstrap_draws)
    for name, entries in scored.items():
        split["per_class"][name]["operating_points"] = entries
    split["operating_points"] = points.record()


def combine_probabilities(probs: list, how: str = "prob") -> np.ndarray:
    """Ensemble members' (n, labels) probabilities -> mean probability ('prob') or sigmoid of the mean logit."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    if how == "prob":
        return stack.mean(axis=0)
    if how != "logit":
        raise ValueError(f"combine {how!r}: prob or logit")
    clipped = np.clip(stack, 1e-7, 1 - 1e-7)
    return 1 / (1 + np.exp(-np.log(clipped / (1 - clipped)).mean(axis=0)))


def evaluate_splits(scores: dict[str, SplitScores], label_names: list[str], out: Path,
                    bootstrap_draws: int = BOOTSTRAP_DRAWS, prefix: str = "", calibrate: str = "none",
                    targets=operating_points.DEFAULT_TARGETS,
                    age_bands=AGE_BANDS) -> tuple[dict, np.ndarray, list[str]]:
    """Thresholds and operating points (`targets`) chosen on val, with `calibrate` "temperature" the
    per-class temperatures fitted on val (written to calibration.json), every metric on val and test
    (AUROC intervals by patient unless bootstrap_draws is 0; ECE before and after scaling), and their
    predictions files (predictions/<prefix><split>.parquet), raw. Once per run, after training:
    nothing here runs per epoch."""
    val = scores["val"]
    thresholds, notes = choose_thresholds(val.y, val.probs, val.mask, label_names)
    points = operating_points.choose(val.y, val.probs, val.mask, label_names, targets)
    temperature, calibration_notes = fit_on_val(calibrate, val.probs, val.y, val.mask, label_names)
    if temperature is not None:
        write_calibration(out, label_names, temperature)
    chosen = {name: scores[name] for name in ("val", "test") if name in scores}
    splits = score_splits(chosen, label_names, thresholds, out, bootstrap_draws, prefix, temperature, points,
                          age_bands=age_bands)
    return splits, thresholds, [f"thresholds: {n}" for n in notes] + points.notes + calibration_notes


def score_splits(scores: dict[str, SplitScores], label_names: list[str], thresholds: np.ndarray, out: Path,
                 bootstrap_draws: int = BOOTSTRAP_DRAWS, prefix: str = "", temperature: np.ndarray | None = None,
                 points: operating_points.OperatingPoints | None = None,
                 age_bands=AGE_BANDS) -> dict:
    """Every metric of each split at the given thresholds (its notes prefixed by the split, per study
    where the dataset has studies), calibration (also after `temperature`, fitted elsewhere), the
    operating points `points` chosen elsewhere, and its predictions file (predictions/<prefix><split>.parquet)."""
    splits = {}
    for name, s in scores.items():
        splits[name] = evaluate(s.y, s.probs, s.mask, label_names, s.has_disease, s.no_finding, thresholds,
                                s.patient_id, bootstrap_draws)
        splits[name]["notes"] = [f"{name}: {n}" for n in splits[name]["notes"]]
        splits[name]["calibration"] = split_calibration(s.y, s.probs, s.mask, label_names, temperature)
        if points is not None:
            _add_operating_points(splits[name], s, label_names, points, bootstrap_draws)
        if s.study_id is not None:
            splits[name]["study_level"] = study_metrics(s, label_names)
        _add_subgroups(splits[name], s, name, label_names, bootstrap_draws, age_bands)
        frame = rundir.predictions_frame(s.image_id, s.probs, label_names, s.y, s.mask, s.has_disease, s.no_finding,
                                         front=_front(s))
        rundir.write_table(frame, out / rundir.PREDICTIONS / f"{prefix}{name}.parquet")
    return splits
