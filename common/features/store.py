"""The feature store on disk: its columns, its manifest, and reading it back.

The contract is ../shared/docs/feature-store.md; docs/feature-store.md is this project's account of it.
The extraction job writes stores through these names; the head trainer reads them
through `read_split`. Both sides change together or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import fs
from common.choices import SPLITS  # noqa: F401 (a store's splits; its readers import them from here)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ERRORS_DIR = "errors"

ERROR_COLUMNS = ("image_id", "path", "error")
# Every split's columns in order, as Arrow types: the executors write their Parquet files with these schemas.
ROW_SCHEMA = pa.schema([("image_id", pa.string()), ("patient_id", pa.string()), ("view", pa.string()),
                        ("age", pa.float32()), ("sex", pa.int8()), ("labels", pa.list_(pa.int8())),
                        ("features", pa.list_(pa.float32()))])
MASKED_FIELDS = (pa.field("lung_fraction", pa.float32()), pa.field("lung_qa", pa.string()))  # --view masked
ERROR_SCHEMA = pa.schema([(c, pa.string()) for c in ERROR_COLUMNS])


class StoreError(ValueError):
    """A store that cannot be read as the contract says; the message is one line."""


def split_dir(store: str | os.PathLike, split: str) -> str:
    return fs.join(store, f"split={split}")


def write_manifest(store: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically: a reader sees the old state or the whole new file."""
    fs.write_bytes(fs.join(store, MANIFEST), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(store: str | os.PathLike) -> dict:
    path = fs.join(store, MANIFEST)
    try:
        text = fs.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise StoreError(f"{store}: no {MANIFEST}, so the store is incomplete or not a feature store") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path}: format_version {version!r} is not one this reader knows ({FORMAT_VERSION})")
    for key in ("label_names", "feature_dim", "dataset", "backbone"):
        if key not in manifest:
            raise StoreError(f"{path}: missing required key {key!r}")
    return manifest


@dataclass
class SplitData:
    """One split of a store, or of several stores fused column-wise, as arrays; rows sorted by image_id."""

    image_id: np.ndarray  # object array of str
    age: np.ndarray  # float32, NaN where unknown
    sex: np.ndarray  # float32: 1 male, 0 female, NaN unknown
    labels: np.ndarray  # int8 (n, n_labels): 1, 0, -1
    features: np.ndarray  # float32 (n, feature_dim; fused: the stores' dims summed), C-contiguous
    patient_id: np.ndarray | None = None  # object array of str: the unit of the metrics' bootstrap
    view: np.ndarray | None = None  # object array of str or None

    def __len__(self) -> int:
        return len(self.image_id)


def _fixed_width(table: pa.Table, column: str, width: int, dtype, where: str) -> np.ndarray:
    """A list column whose rows all have `width` entries, as an (n, width) array, without Python loops."""
    col = table.column(column).combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = table.column("image_id")[int(bad[0])].as_py()
        raise StoreError(
            f"{where}: row {row!r} has {lengths[bad[0]]} {column} values, manifest says {width}"
        )
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.astype(dtype, copy=False).reshape(len(table), width))


def _finite(features: np.ndarray, table: pa.Table, where: str) -> np.ndarray:
    """Refuse NaN/Inf features: a head would train on them or write NaN probabilities."""
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        first = table.column("image_id")[int(np.flatnonzero(bad)[0])].as_py()
        raise StoreError(f"{where}: {int(bad.sum())} rows have NaN or Inf features, first {first!r}; "
                         "re-extract the store")
    return features


def data_files(store: str | os.PathLike, part: str, manifest: dict) -> list[str] | None:
    """The files of `part` (a split, or "errors") the manifest lists; None when the part is not in the store.

    Only listed files are the store's: an object store may hold files of a killed attempt beside them.
    A manifest without `files` (written before the list existed) means every Parquet file in the folder."""
    listed = manifest.get("files")
    if listed is not None:
        names = listed.get(part)
        return [fs.join(store, name) for name in names] if names else None
    folder = split_dir(store, part) if part in SPLITS else fs.join(store, ERRORS_DIR)
    found = [path for path, _ in fs.list_files(folder) if path.endswith(".parquet")]
    return found or None


def store_splits(store: str | os.PathLike, manifest: dict) -> list[str]:
    """The splits that have rows, in SPLITS order."""
    return [s for s in SPLITS if data_files(store, s, manifest)]


def read_parquet(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """Listed Parquet files (local paths or URIs of one file system) as one table."""
    filesystem, _ = fs.resolve(files[0])
    return pq.read_table([fs.resolve(f)[1] for f in files], filesystem=filesystem, columns=columns)


def read_split(store: str | os.PathLike, split: str, manifest: dict | None = None) -> SplitData:
    """Read one split into arrays; refuses rows whose widths disagree with the manifest."""
    manifest = manifest or read_manifest(store)
    where = str(split_dir(store, split))
    files = data_files(store, split, manifest)
    if not files:
        raise StoreError(f"{where}: split {split!r} is not in this store")
    table = read_parquet(files).sort_by("image_id")
    n_labels = len(manifest["label_names"])
    age = table.column("age").to_numpy(zero_copy_only=False).astype(np.float32)
    sex = pc.cast(table.column("sex"), pa.float32()).to_numpy(zero_copy_only=False)
    return SplitData(
        image_id=np.asarray(table.column("image_id").to_pylist(), dtype=object),
        patient_id=np.asarray(table.column("patient_id").to_pylist(), dtype=object),
        view=np.asarray(table.column("view").to_pylist(), dtype=object),
        age=age,
        sex=sex.astype(np.float32),
        labels=_fixed_width(table, "labels", n_labels, np.int8, where),
        features=_finite(_fixed_width(table, "features", int(manifest["feature_dim"]), np.float32, where), table, where),
    )


def read_errors(store: str | os.PathLike, manifest: dict | None = None) -> pa.Table:
    """The images the job could not read: image_id, path, error."""
    files = data_files(store, ERRORS_DIR, manifest or read_manifest(store))
    return read_parquet(files, list(ERROR_COLUMNS)) if files else ERROR_SCHEMA.empty_table()
