"""A run directory and the files in it, written by heads.train and read by heads.report/predict.

    <run>/config.json             resolved settings, command line, software versions, stores used
    <run>/head.pt                 the head: weights + everything needed to rebuild and feed it
    <run>/metrics.json            per-split metrics, epoch history, grid cells, thresholds, notes
    <run>/predictions/<split>.parquet   image_id, a probability column per label, `label:<name>`
                                  targets (-1 where masked), has_disease, no_finding
    <run>/report.md, roc_<split>.png, loss.png    rendered by heads.report
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.torch_files import load_versioned
from heads.data import InputSpec
from heads.models import HeadSpec, build_head

CHECKPOINT = "head.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions"
REPORT = "report.md"
HEAD_FORMAT = "cxr-features/head"
HEAD_FORMAT_VERSION = 1
TARGET_PREFIX = "label:"


class RunError(ValueError):
    """A run directory or head checkpoint that cannot be used; the message is one line."""


def prepare(out: str | Path, overwrite: bool) -> Path:
    """An empty run directory; replaces an old run only with overwrite, and never a non-run folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not ((out / CONFIG).exists() or (out / CHECKPOINT).exists()):
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
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path}: not found; is {path.parent} a run directory written by heads.train?")
    return json.loads(path.read_text())


# --- checkpoint -----------------------------------------------------------------------------


@dataclass
class Head:
    model: torch.nn.Module
    spec: HeadSpec
    inputs: InputSpec
    label_names: list[str]
    stores: list[dict]  # StoreInfo.describe() of each fused store, in fusion order
    thresholds: np.ndarray
    precision: str
    policy: str
    dataset: str


def save_head(path: Path, model: torch.nn.Module, spec: HeadSpec, inputs: InputSpec, label_names: list[str],
              stores: list[dict], thresholds: np.ndarray, precision: str, policy: str, dataset: str,
              config: dict) -> None:
    # Only tensors, numbers, strings, lists and dicts, so torch.load(weights_only=True) reads it.
    torch.save(
        {
            "format": HEAD_FORMAT,
            "format_version": HEAD_FORMAT_VERSION,
            "head": spec.to_dict(),
            "state_dict": model.state_dict(),
            "inputs": inputs.to_dict(),
            "label_names": list(label_names),
            "stores": jsonable(stores),
            "thresholds": [float(t) for t in thresholds],
            "precision": precision,
            "policy": policy,
            "dataset": dataset,
            "config": jsonable(config),
        },
        path,
    )


def load_head(run_or_file: str | Path) -> Head:
    """A head from a run directory or a head.pt file, ready for inference (eval mode)."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise RunError(f"--run {run_or_file}: no {CHECKPOINT} found")
    obj = load_versioned(path, HEAD_FORMAT, HEAD_FORMAT_VERSION, RunError, "head checkpoint")
    spec = HeadSpec.from_dict(obj["head"])
    model = build_head(spec)
    model.load_state_dict(obj["state_dict"])
    model.eval()
    return Head(model, spec, InputSpec.from_dict(obj["inputs"]), list(obj["label_names"]), list(obj["stores"]),
                np.asarray(obj["thresholds"], dtype=float), obj["precision"], obj["policy"], obj["dataset"])


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
