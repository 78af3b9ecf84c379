"""Small feature stores that follow docs/feature-store.md, written with pyarrow, for the heads tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.data.labels import NIH_LABELS
from common.images.data_config import DataConfig
from common.features.store import FORMAT_VERSION, split_dir, write_manifest


def _list_array(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))


def split_table(rows: dict) -> pa.Table:
    """The contract's columns, in its order and Arrow types, from a dict of arrays."""
    n = len(rows["image_id"])
    return pa.table({
        "image_id": pa.array(rows["image_id"], pa.string()),
        "patient_id": pa.array(rows.get("patient_id", rows["image_id"]), pa.string()),
        "view": pa.array(rows.get("view", ["PA"] * n), pa.string()),
        "age": pa.array(rows["age"], pa.float32(), from_pandas=True),
        "sex": pa.array(rows["sex"], pa.int8(), from_pandas=True),
        "labels": _list_array(np.asarray(rows["labels"], dtype=np.int8), pa.int8()),
        "features": _list_array(np.asarray(rows["features"], dtype=np.float32), pa.float32()),
    })


def write_store(root: Path, splits: dict[str, dict], label_names=NIH_LABELS, dataset: str = "nih",
                backbone: str = "resnet50", weights: str = "random:0", files_per_split: int = 2,
                manifest_extra: dict | None = None) -> Path:
    """A complete store: split=<name>/part-<i>.parquet for each split, then manifest.json."""
    root = Path(root)
    feature_dim = None
    for name, rows in splits.items():
        table = split_table(rows)
        feature_dim = np.asarray(rows["features"]).shape[1]
        folder = Path(split_dir(root, name))
        folder.mkdir(parents=True, exist_ok=True)
        step = -(-len(table) // files_per_split)
        for i in range(files_per_split):
            pq.write_table(table.slice(i * step, step), folder / f"part-{i}.parquet")
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": dataset, "label_names": list(label_names),
        "feature_dim": int(feature_dim), "backbone": backbone, "weights": weights,
        "data_config": DataConfig(224).to_dict(), "splits": {k: len(v["image_id"]) for k, v in splits.items()},
        "errors": 0, "created": "2026-01-01T00:00:00+00:00",
    }
    manifest.update(manifest_extra or {})
    write_manifest(root, manifest)
    return root


def synthetic_rows(n: int, dim: int, n_labels: int, rng: np.random.Generator, signal: float = 0.0,
                   prevalence: float = 0.25, uncertain: float = 0.0, prefix: str = "img") -> dict:
    """Random images; with signal > 0 feature c carries label c (shifted by `signal` when positive)."""
    labels = (rng.random((n, n_labels)) < prevalence).astype(np.int8)
    if uncertain:
        labels[rng.random((n, n_labels)) < uncertain] = -1
    features = rng.standard_normal((n, dim)).astype(np.float32)
    k = min(dim, n_labels)
    features[:, :k] += signal * (labels[:, :k] == 1)
    age = rng.uniform(20, 90, n).astype(np.float32)
    age[::17] = np.nan
    sex = rng.integers(0, 2, n).astype(float)
    sex[::13] = np.nan
    ids = [f"{prefix}_{i:05d}.png" for i in range(n)]
    return {"image_id": ids, "patient_id": [f"p{i // 2}" for i in range(n)], "age": age, "sex": sex,
            "labels": labels, "features": features}


def synthetic_store(root: Path, sizes=None, dim: int = 32, label_names=NIH_LABELS, signal: float = 0.0,
                    seed: int = 0, **kwargs) -> Path:
    rng = np.random.default_rng(seed)
    sizes = sizes or {"train": 600, "val": 300, "test": 300}
    uncertain = kwargs.pop("uncertain", 0.0)
    prevalence = kwargs.pop("prevalence", 0.25)
    splits = {name: synthetic_rows(n, dim, len(label_names), rng, signal, prevalence, uncertain, prefix=name)
              for name, n in sizes.items()}
    return write_store(root, splits, label_names, **kwargs)
