"""A trained model's probabilities on val and test -> metrics and prediction files of a run.

Shared by heads.train (heads on stored features) and jobs/finetune.py (whole models on images),
so both runs have the same metrics.json splits and predictions/ files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import rundir
from common.metrics import choose_thresholds, evaluate


@dataclass
class SplitScores:
    image_id: np.ndarray
    probs: np.ndarray  # (n, labels)
    y: np.ndarray  # (n, labels) 0/1
    mask: np.ndarray  # (n, labels) bool
    has_disease: np.ndarray  # (n,) bool, over all the dataset's disease labels (heads.data.finding_flags)
    no_finding: np.ndarray


def evaluate_splits(scores: dict[str, SplitScores], label_names: list[str], out: Path
                    ) -> tuple[dict, np.ndarray, list[str]]:
    """Thresholds chosen on val, every metric on val and test, and their predictions files."""
    val = scores["val"]
    thresholds, notes = choose_thresholds(val.y, val.probs, val.mask, label_names)
    splits = {}
    for name in ("val", "test"):
        if name not in scores:
            continue
        s = scores[name]
        splits[name] = evaluate(s.y, s.probs, s.mask, label_names, s.has_disease, s.no_finding, thresholds)
        splits[name]["notes"] = [f"{name}: {n}" for n in splits[name]["notes"]]
        frame = rundir.predictions_frame(s.image_id, s.probs, label_names, s.y, s.mask, s.has_disease, s.no_finding)
        rundir.write_table(frame, out / rundir.PREDICTIONS / f"{name}.parquet")
    return splits, thresholds, [f"thresholds: {n}" for n in notes]
