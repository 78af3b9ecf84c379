"""The head checkpoint (head.pt): weights and everything needed to rebuild and feed the head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.runs.rundir import HEAD_CHECKPOINT, RunError, jsonable
from common.models.torch_files import load_versioned, save_atomic
from heads.data import InputSpec
from heads.models import HeadSpec, build_head

CHECKPOINT = HEAD_CHECKPOINT
HEAD_FORMAT = "cxr-features/head"
HEAD_FORMAT_VERSION = 1


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
    save_atomic(
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
        Path(path),
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
