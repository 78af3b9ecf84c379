"""A run directory and the files in it, written by heads.train and jobs/finetune.py, read by the report and predict.

    <run>/config.json             resolved settings, command line, software versions, stores used
    <run>/head.pt                 the head: weights + everything needed to rebuild and feed it
    <run>/metrics.json            per-split metrics, epoch history, grid cells, thresholds, notes
    <run>/predictions/<split>.parquet   image_id, a probability column per label, `label:<name>`
                                  targets (-1 where masked), has_disease, no_finding
    <run>/report.md, roc_<split>.png, loss.png    rendered by heads.report
"""

from __future__ import annotations

import json
import os
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd


CONFIG = "config.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions"
REPORT = "report.md"
TARGET_PREFIX = "label:"


class RunError(ValueError):
    """A run directory or head checkpoint that cannot be used; the message is one line."""


def prepare(out: str | Path, overwrite: bool) -> Path:
    """An empty run directory; replaces an old run only with overwrite, and never a non-run folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / CONFIG).exists():
            raise RunError(f"--out {out}: exists and is not a run directory; refusing to write into it")
        if not overwrite:
            raise RunError(f"--out {out}: a run is already here; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def jsonable(obj):
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: Path, obj) -> None:
    """Written to a temporary name, then renamed: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path}: not found; is {path.parent} a run directory?")
    return json.loads(path.read_text())


# --- predictions ----------------------------------------------------------------------------


def predictions_frame(image_id, probs: np.ndarray, label_names: list[str], targets=None, mask=None,
                      has_disease=None, no_finding=None, front: dict | None = None) -> pd.DataFrame:
    """image_id [+ front columns], one probability column per label [+ targets and finding flags]."""
    cols = {"image_id": np.asarray(image_id, dtype=object), **(front or {})}
    cols.update({name: probs[:, i].astype(np.float32) for i, name in enumerate(label_names)})
    if targets is not None:
        y = np.where(mask, targets, -1).astype(np.int8)
        cols.update({TARGET_PREFIX + name: y[:, i] for i, name in enumerate(label_names)})
        cols["has_disease"] = np.asarray(has_disease, dtype=bool)
        cols["no_finding"] = np.asarray(no_finding, dtype=bool)
    return pd.DataFrame(cols)


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        raise RunError(f"--out {path}: name a .parquet or .csv file")
    return path


def read_predictions(path: Path, label_names: list[str]) -> dict[str, np.ndarray]:
    """Arrays back from a run's predictions file, for re-rendering ROC curves."""
    df = pd.read_parquet(path)
    y = df[[TARGET_PREFIX + n for n in label_names]].to_numpy()
    return {
        "image_id": df["image_id"].to_numpy(),
        "probs": df[list(label_names)].to_numpy(dtype=np.float64),
        "y": (y == 1).astype(np.float32),
        "mask": y >= 0,
        "has_disease": df["has_disease"].to_numpy(),
        "no_finding": df["no_finding"].to_numpy(),
    }
