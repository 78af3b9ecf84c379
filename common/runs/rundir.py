"""A run directory and the files in it, written by heads.train and jobs/fine_tune.py, read by the report and predict.

    <run>/.cxr-run.json           the marker: written first, it makes the folder a run directory
    <run>/config.json             resolved settings, command line, software versions, stores used
    <run>/head.pt                 the head: weights + everything needed to rebuild and feed it
    <run>/best.pt, last.pt        a fine-tune run's checkpoints (finetune/checkpoint.py)
    <run>/metrics.json            per-split metrics, epoch history, grid cells, thresholds, notes
    <run>/predictions/<split>.parquet   image_id, who the image is (FRONT_COLUMNS, where known), a
                                  probability column per label, `label:<name>` targets (-1 where
                                  masked), has_disease, no_finding
    <run>/calibration.json        per-class temperatures fitted on val (heads.train --calibrate temperature)
    <run>/report.md, roc_<split>.png, pr_<split>.png, reliability_<split>.png, loss.png    rendered by heads.report
    <run>/model_card.md, model_card.json   what the model is, its data, weights, test metrics and warnings
    <run>/localization/*.png      a fine-tune run's CAM overlays
    <run>/overlays/*.png          a lung segmentation run's best and worst test masks (lungs/)

A folder is a run directory only by its marker: a config.json proves nothing (any tool writes
one). --overwrite deletes only the names above (OWN and friends), never a user's files.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from common import atomic
from common.runs.safe_output import LOCK, OutputLock, check_dir_path


MARKER = ".cxr-run.json"
RUN_FORMAT = "cxr-features/run"
RUN_FORMAT_VERSION = 1
# evaluation: heads.evaluate; ensemble: heads.ensemble; lungs: a lung model's training; lungs-evaluation: its scoring
KINDS = ("head", "finetune", "lungs", "lungs-evaluation", "evaluation", "ensemble")
CONFIG = "config.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions"
REPORT = "report.md"
LOSS_PLOT = "loss.png"
HEAD_CHECKPOINT = "head.pt"
BEST = "best.pt"
LAST = "last.pt"
LOCALIZATION = "localization"
OVERLAYS = "overlays"
TARGET_PREFIX = "label:"
# Who each image is, after image_id in a predictions file: the bootstrap's unit and the attributes that
# common/evaluation/subgroups.py groups by (sex "M"/"F"/None, age in years or NaN, view, source: the
# dataset or table a row came from). Runs from before them lack these columns.
GROUP_COLUMNS = ("sex", "age", "view", "source")
FRONT_COLUMNS = ("patient_id", *GROUP_COLUMNS)
CALIBRATION = "calibration.json"  # per-class temperatures fitted on val (common/evaluation/calibration.py)
MODEL_CARD = "model_card.md"  # and MODEL_CARD_JSON: common/evaluation/model_card.py
MODEL_CARD_JSON = "model_card.json"
ERRORS = "errors.csv"  # an evaluation on image files: each image that could not be scored, and why

# Everything a run writes, and all that --overwrite may delete: the files at the top of the
# directory, their temporary names (common/atomic.py's .<name>.<pid>-<thread>.tmp; before it, .<name>.tmp
# and <name>.tmp), and inside the folders only the files the run puts there.
OWN_FILES = frozenset({MARKER, CONFIG, METRICS, REPORT, LOSS_PLOT, HEAD_CHECKPOINT, BEST, LAST, CALIBRATION,
                       MODEL_CARD, MODEL_CARD_JSON, ERRORS})
# <plot>_<split>.png; a lock taker killed mid-takeover
OWN_PATTERNS = ("roc_*.png", "pr_*.png", "reliability_*.png", f"{LOCK}.stale-*")
EPOCH_CHECKPOINTS = "checkpoints"  # fine-tune: epoch-NNN.pt, kept for a checkpoint ensemble
OWN_DIRS = {PREDICTIONS: "*.parquet", LOCALIZATION: "*.png", OVERLAYS: "*.png", EPOCH_CHECKPOINTS: "epoch-*.pt"}


class RunError(ValueError):
    """A run directory or head checkpoint that cannot be used; the message is one line."""


def roc_plot(split: str) -> str:
    return f"roc_{split}.png"


def pr_plot(split: str) -> str:
    return f"pr_{split}.png"


def reliability_plot(split: str) -> str:
    return f"reliability_{split}.png"


_TEMPORARY = re.compile(r"^(?P<name>.+?)(\.\d+-\d+)?\.tmp$")


def _own_file(name: str) -> bool:
    temporary = _TEMPORARY.match(name)
    names = {name, temporary["name"], temporary["name"].removeprefix(".")} if temporary else {name}
    return any(n in OWN_FILES or any(fnmatch.fnmatchcase(n, p) for p in OWN_PATTERNS) for n in names)


def read_marker(out: Path) -> dict | None:
    """The marker of run directory `out`, or None when `out` is not one."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == RUN_FORMAT else None


def check_run_dir(out: str | Path) -> dict | None:
    """The marker of `out`; None when `out` is absent or empty (our own lock aside); RunError for a
    folder that is not a run directory of this project, or one of a newer format."""
    out = Path(out)
    if not out.exists() or not any(c.name != LOCK for c in out.iterdir()):
        return None
    marker = read_marker(out)
    if marker is None:
        raise RunError(f"--out {out}: exists and is not a run directory of this project (no {MARKER}); "
                       "refusing to write into it")
    version = marker.get("format_version")
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise RunError(f"--out {out}: a run directory of format_version {version!r}, which this cxr-features "
                       f"(version {RUN_FORMAT_VERSION}) does not know; refusing to write into it")
    return marker


def clear(out: Path, log=print) -> None:
    """Delete what a run wrote into `out` and keep everything else (named in one log line). The
    marker stays, so a clear that is killed halfway still leaves a run directory."""
    kept = []
    (out / METRICS).unlink(missing_ok=True)  # first: a half-cleared run never looks finished
    for child in sorted(out.iterdir()):
        if child.name in (LOCK, MARKER):
            continue
        if child.name in OWN_DIRS and child.is_dir() and not child.is_symlink():
            for f in sorted(child.iterdir()):
                if f.is_file() and fnmatch.fnmatchcase(f.name, OWN_DIRS[child.name]):
                    f.unlink()
                else:
                    kept.append(f"{child.name}/{f.name}")
            if not any(child.iterdir()):
                child.rmdir()
        elif _own_file(child.name) and (child.is_symlink() or not child.is_dir()):
            child.unlink()
        else:
            kept.append(child.name)
    if kept:
        log(f"--overwrite: kept {len(kept)} file(s) in {out} that this project did not write: "
            + ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else ""))


def discard_if_empty(out: str | Path) -> None:
    """Remove a run directory that holds nothing but its marker (a run that failed before writing)."""
    out = Path(out)
    if out.is_dir() and {p.name for p in out.iterdir()} <= {MARKER}:
        (out / MARKER).unlink(missing_ok=True)
        out.rmdir()


def check_not_input(out: str | Path, inputs=()) -> None:
    """Refuse an --out that is one of the command's own inputs, or holds one: --overwrite would delete
    what the command is about to read (an ensemble member, the head being evaluated, a checkpoint)."""
    target = Path(out).resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if inp == target or target in inp.parents:
            raise RunError(f"--out {out}: is an input of this command ({given}); write the result to another folder")


def prepare(out: str | Path, overwrite: bool, kind: str = "head", log=print, inputs=()) -> Path:
    """A run directory ready for a new run of `kind`: made and marked when absent or empty, an old
    run of the same kind replaced only with overwrite (its files only); never a folder without the
    marker, a run of another kind, or a folder that is (or holds) one of `inputs`."""
    if kind not in KINDS:
        raise ValueError(f"run kind {kind!r}: choose from {', '.join(KINDS)}")
    out = Path(out)
    check_not_input(out, inputs)
    marker = check_run_dir(out)
    if marker is not None:
        if marker.get("kind") != kind:
            raise RunError(f"--out {out}: holds a {marker.get('kind')} run, and this command writes a {kind} run; "
                           "--overwrite replaces only a run of the same kind: choose another folder")
        if not overwrite:
            raise RunError(f"--out {out}: a run is already here; pass --overwrite to replace it")
        log(f"--overwrite: replacing the run in {out}")
        clear(out, log)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "kind": kind,
                              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
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
    """Written whole (common/atomic.py): a kill never leaves half a file."""
    atomic.write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path}: not found; is {path.parent} a run directory?")
    return json.loads(path.read_text())


# --- predictions ----------------------------------------------------------------------------


def predictions_frame(image_id, probs: np.ndarray, label_names: list[str], targets=None, mask=None,
                      has_disease=None, no_finding=None, front: dict | None = None) -> pd.DataFrame:
    """image_id [+ front columns], one probability column per label [+ targets and finding flags]."""
    if clash := sorted(set(front or {}) & set(label_names)):
        raise RunError(f"label {clash[0]!r}: also the name of a predictions column ({', '.join(front)}); rename the label")
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
    return predictions_arrays(pd.read_parquet(path), label_names)


def predictions_arrays(df: pd.DataFrame, label_names: list[str]) -> dict[str, np.ndarray]:
    """A predictions frame's image ids, probabilities, targets (y 0/1, mask of the scored entries) and flags;
    "patient_id" and "groups" ({column: values} of GROUP_COLUMNS) are None in a file from before them."""
    y = df[[TARGET_PREFIX + n for n in label_names]].to_numpy()
    return {
        "image_id": df["image_id"].to_numpy(),
        "probs": df[list(label_names)].to_numpy(dtype=np.float64),
        "y": (y == 1).astype(np.float32),
        "mask": y >= 0,
        "has_disease": df["has_disease"].to_numpy(),
        "no_finding": df["no_finding"].to_numpy(),
        "patient_id": df["patient_id"].to_numpy(dtype=object) if "patient_id" in df else None,
        "groups": ({c: df[c].to_numpy(dtype=np.float64 if c == "age" else object) for c in GROUP_COLUMNS}
                   if set(GROUP_COLUMNS) <= set(df.columns) else None),
    }


def write_run(out: str, overwrite: bool, kind: str, work, log=print, inputs=()):
    """`work(run_dir)` inside a prepared run directory of `kind`, the one way every run-writing command
    writes (`inputs`: the paths it reads, never replaced, see prepare): one writer per directory (the
    lock, held from the overwrite decision to the last file), and a run refused before its first file
    leaves no folder behind. Errors pass through to the command's exit (common.runs.command)."""
    fresh = not os.path.exists(out)
    try:
        with OutputLock(check_dir_path(out), log=log):
            return work(prepare(out, overwrite, kind=kind, log=log, inputs=inputs))
    finally:
        if fresh:
            discard_if_empty(out)
