"""A trained model scored on labelled data it was not trained on: its labels paired with the data's
(common/data/labels.py), one split's scores, and the route from image files (another hospital's table:
each image through the run's own model and data config). heads/evaluate.py is the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.image_table import ImageTable, build_image_table, mapping_from_flags
from common.data.labels import relabel, shared_labels
from common.data.targets import eval_targets, finding_flags
from common.evaluation.scores import SplitScores
from common.evaluation.studies import study_ids
from common.evaluation.subgroups import image_groups
from common.features.store import StoreError
from common.runs import rundir
from finetune.predictor import FinetuneOnImages  # heads' one way into finetune (tests/test_structure.py)
from heads.checkpoint import load_head
from heads.predictions import HeadOnImages, predict_files

# The split an evaluation on image files scores: every image of the other table, as a held-out test set.
IMAGES_SPLIT = "test"


def pair_labels(model_names, model_dataset: str, data_names, data_dataset: str, where: str) -> list[tuple[str, str]]:
    """(model label, data label) pairs to score; a one-line error when there is none."""
    pairs = shared_labels(model_names, data_names, same_dataset=data_dataset == model_dataset)
    if not pairs:
        raise StoreError(f"{where}: no label of the model ({', '.join(model_names)}) is a label of this "
                         f"{data_dataset} data ({', '.join(data_names)}), even through common/data/labels.py's aliases")
    return pairs


def paired_scores(probs: np.ndarray, labels: np.ndarray, data_names, pairs, data_dataset: str, model_dataset: str,
                  image_id, patient_id, groups: dict) -> SplitScores:
    """One split's SplitScores on the paired labels: `probs` (n, pairs) already in the pairs' order, the
    data's raw `labels` (n, data_names) relabelled to the model's names; uncertain entries masked out."""
    names = [m for m, _ in pairs]
    relabelled = relabel(labels, data_names, names, same_dataset=data_dataset == model_dataset)
    y, mask = eval_targets(relabelled.astype(np.int8))  # every column is paired: no NaN left
    has_disease, no_finding = finding_flags(labels, tuple(data_names))  # over the data's own disease labels
    return SplitScores(np.asarray(image_id), probs, y, mask, has_disease, no_finding, np.asarray(patient_id),
                       study_ids(data_dataset, np.asarray(image_id)), groups)


@dataclass
class RunModel:
    """A head or fine-tune run as one model on image files (raw probabilities: the caller applies the run's
    calibration), with what scoring needs of the run."""

    kind: str
    run: Path
    predictor: object  # heads.predictions.HeadOnImages or finetune.predictor.FinetuneOnImages
    label_names: list[str]
    dataset: str
    thresholds: np.ndarray  # per label, chosen on the run's own val
    config: dict

    def describe(self) -> dict:
        """What config.json says of the scored model: a head's stores, or the fine-tuned weights."""
        if self.kind == "head":
            return {"stores": list(self.predictor.head.stores)}
        return {"weights": self.config.get("weights"), "data_config": self.predictor.data_config.to_dict()}


def load_run_model(run: str | Path, device: str, precision: str, threads: int | None, log) -> RunModel:
    """The model of a head or fine-tune run directory, by its marker's kind, built once."""
    path = Path(run)
    folder = path if path.is_dir() else path.parent
    marker = rundir.read_marker(folder) or {}
    config = rundir.read_json(folder / rundir.CONFIG) if (folder / rundir.CONFIG).is_file() else {}
    kind = marker.get("kind", "head" if path.name == "head.pt" else None)
    if kind == "head":
        head = load_head(run)
        return RunModel(kind, folder, HeadOnImages(head, device, precision, threads, log), list(head.label_names),
                        head.dataset, np.asarray(head.thresholds, dtype=float), config)
    if kind == "finetune":
        if not (folder / rundir.BEST).is_file():
            raise StoreError(f"--run {run}: no {rundir.BEST} (the fine-tune has not finished an epoch)")
        predictor = FinetuneOnImages(folder / rundir.BEST, device)
        metrics = rundir.read_json(folder / rundir.METRICS) if (folder / rundir.METRICS).is_file() else {}
        chosen = metrics.get("thresholds") or {}
        thresholds = np.array([chosen.get(n, 0.5) for n in predictor.label_names], dtype=float)
        return RunModel(kind, folder, predictor, list(predictor.label_names), str(config.get("dataset", "")),
                        thresholds, config)
    raise StoreError(f"--run {run}: a {kind or 'unmarked'} run; score a head (heads.train) or fine-tune run on images")


def read_labelled_table(settings, log) -> ImageTable:
    """Every labelled, located image of the other table (--dataset, --metadata, --images and the column
    flags), all in IMAGES_SPLIT: no seeded split, the whole table is held out."""
    try:
        return build_image_table(settings.dataset, settings.metadata, settings.images, split="ratios",
                                 ratios=(0.0, 0.0, 1.0), seed=0, keep_laterals=settings.keep_laterals,
                                 limit=settings.limit, log=log, mapping=mapping_from_flags(settings),
                                 label_table=settings.label_table, workers=settings.header_workers)
    except (FileNotFoundError, ValueError) as exc:
        raise StoreError(str(exc)) from None


def image_scores(model: RunModel, table: ImageTable, pairs, source: str, batch_size: int, max_pixels: int,
                 log) -> tuple[SplitScores, pd.DataFrame]:
    """The table's images through the model: the scores of the readable ones on the paired labels, and a
    row per image that could not be scored (image_id, path, error), counted, never the end of the run."""
    rows = table.table
    ids, paths = rows["image_id"].astype(str).tolist(), rows["path"].astype(str).tolist()
    probs, errors, _ = predict_files(model.predictor, ids, paths, None, batch_size, max_pixels, log)
    good = np.array([e is None for e in errors], dtype=bool)
    if not good.any():
        raise StoreError(f"--images: none of the table's {len(ids)} images could be scored, e.g. {ids[0]}: {errors[0]}")
    kept = rows[good].reset_index(drop=True)
    columns = [model.label_names.index(m) for m, _ in pairs]
    labels = np.stack(kept["labels"].to_numpy()).astype(np.int8)
    groups = image_groups(len(kept), kept["sex"], kept["age"], kept["view"], source)
    scores = paired_scores(probs[good][:, columns], labels, table.label_names, pairs, table.dataset, model.dataset,
                           kept["image_id"].to_numpy(dtype=object), kept["patient_id"].to_numpy(dtype=object), groups)
    failed = pd.DataFrame({"image_id": np.asarray(ids, dtype=object)[~good], "path": np.asarray(paths, dtype=object)[~good],
                           "error": np.asarray(errors, dtype=object)[~good]})
    return scores, failed
