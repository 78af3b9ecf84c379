"""Feature stores -> the arrays a head trains on.

Reading one store or fusing several column-wise, and building the input matrix (features, optionally age and sex, standardized with
statistics fitted on train only). Everything is whole-array numpy; no per-row Python loops.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

import numpy as np

from common import fs
from common.features.store import MANIFEST, SplitData, StoreError, read_manifest, read_split
from common.features.store import store_splits as splits_with_rows
from heads.choices import SEX_ENCODINGS


@dataclass
class StoreInfo:
    """One store as a run records it: where it was and exactly which manifest it had."""

    path: str
    manifest: dict
    sha256: str  # of manifest.json's bytes: a re-extracted store has a new `created`, so a new hash

    def describe(self) -> dict:
        m = self.manifest
        return {
            "path": self.path,
            "manifest_sha256": self.sha256,
            "dataset": m.get("dataset"),
            "backbone": m.get("backbone"),
            "weights": m.get("weights"),
            "weights_sha256": m.get("weights_sha256"),
            "feature_dim": int(m["feature_dim"]),
            "data_config": m.get("data_config"),
            "view": m.get("view", "original"),
            # The lung model of a masked store: predicting from images must mask with this very file.
            "lungs": {k: m["lungs"].get(k) for k in ("label", "sha256", "size", "postprocess")} if m.get("lungs") else None,
        }


@dataclass
class Stores:
    infos: list[StoreInfo]
    label_names: tuple[str, ...]
    splits: dict[str, SplitData]

    @property
    def dataset(self) -> str:
        return str(self.infos[0].manifest.get("dataset"))

    @property
    def feature_dims(self) -> list[int]:
        return [int(i.manifest["feature_dim"]) for i in self.infos]


def store_info(path: str | os.PathLike) -> StoreInfo:
    manifest = read_manifest(path)  # refuses missing manifest / unknown format_version
    digest = hashlib.sha256(fs.read_bytes(fs.join(path, MANIFEST))).hexdigest()
    # Absolute: a run directory is read from other working directories too (a URI already is).
    return StoreInfo(fs.local_path(path) if fs.is_local(path) else path, manifest, digest)


def store_splits(path: str | os.PathLike) -> list[str]:
    return splits_with_rows(path, read_manifest(path))


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    only = sorted(set(a.tolist()) ^ set(b.tolist()))
    return repr(only[0]) if only else "(same ids, different count)"


def _fuse(parts: list[SplitData], infos: list[StoreInfo], split: str) -> SplitData:
    first = parts[0]
    for part, info in zip(parts[1:], infos[1:]):
        if len(part) != len(first) or not np.array_equal(part.image_id, first.image_id):
            raise StoreError(
                f"{info.path}: split={split} image_ids differ from {infos[0].path}'s "
                f"(e.g. {_first_difference(part.image_id, first.image_id)}); fused stores must hold the same images"
            )
        if not np.array_equal(part.labels, first.labels):
            row = int(np.flatnonzero((part.labels != first.labels).any(axis=1))[0])
            raise StoreError(
                f"{info.path}: split={split} labels differ from {infos[0].path}'s for {first.image_id[row]!r}; "
                "fused stores must come from the same metadata"
            )
    features = first.features if len(parts) == 1 else np.concatenate([p.features for p in parts], axis=1)
    return replace(first, features=features)


def open_stores(paths: list[str], splits: list[str] | None = None) -> Stores:
    """Read `splits` (default: all the first store has) of one store, or of several fused column-wise.

    Fusion is refused, with a one-line StoreError, unless every store has the same label names,
    the same splits and, split by split, the same image_ids and labels.
    """
    if not paths:
        raise StoreError("--store: give at least one feature store")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise StoreError(f"--store: a store is given twice ({', '.join(paths)})")
    infos = [store_info(p) for p in paths]
    names = tuple(infos[0].manifest["label_names"])
    have = store_splits(paths[0])
    for info in infos[1:]:
        if tuple(info.manifest["label_names"]) != names:
            raise StoreError(f"{info.path}: label_names differ from {infos[0].path}'s; only stores of one dataset fuse")
        if store_splits(info.path) != have:
            raise StoreError(
                f"{info.path}: has splits {store_splits(info.path)}, {infos[0].path} has {have}; fused stores need the same"
            )
    wanted = have if splits is None else list(splits)
    for split in wanted:
        if split not in have:
            raise StoreError(f"{paths[0]}: has no split={split} (it has {', '.join(have) or 'none'})")
    out = {}
    for split in wanted:
        parts = [read_split(i.path, split, i.manifest) for i in infos]
        out[split] = _fuse(parts, infos, split)
        del parts
    return Stores(infos, names, out)


# --- inputs ---------------------------------------------------------------------------------


@dataclass
class InputSpec:
    """How a split becomes the head's input; saved in the checkpoint so predict rebuilds it exactly."""

    feature_dims: list[int]
    age_sex: bool
    sex_encoding: str
    age_fill: float  # train mean age, for unknown ages
    mean: np.ndarray  # float32 (width,), fitted on train
    std: np.ndarray  # float32 (width,), 1 where a column is constant on train

    @property
    def width(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        return {
            "feature_dims": list(self.feature_dims),
            "age_sex": self.age_sex,
            "sex_encoding": self.sex_encoding,
            "age_fill": float(self.age_fill),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(
            list(d["feature_dims"]), bool(d["age_sex"]), d["sex_encoding"], float(d["age_fill"]),
            np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32),
        )


def demographics(age: np.ndarray, sex: np.ndarray, encoding: str, age_fill: float) -> np.ndarray:
    """age/100 then sex: 'indicator' is one column (1 male, 0 female, 0.5 unknown), which with
    ResNet50's 2,048 features gives the 2,050-wide input of the seed work; 'onehot' is two
    columns (male, female), both 0 when unknown."""
    if encoding not in SEX_ENCODINGS:
        raise ValueError(f"--sex-encoding {encoding!r}: choose from {', '.join(SEX_ENCODINGS)}")
    age = np.where(np.isnan(age), np.float32(age_fill), age).astype(np.float32) / np.float32(100.0)
    if encoding == "indicator":
        return np.stack([age, np.where(np.isnan(sex), np.float32(0.5), sex).astype(np.float32)], axis=1)
    return np.stack([age, (sex == 1).astype(np.float32), (sex == 0).astype(np.float32)], axis=1)


def _column_moments(x: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std in float64, chunk by chunk, so no full-size temporary is made."""
    n = len(x)
    total = np.zeros(x.shape[1], dtype=np.float64)
    for s in range(0, n, chunk):
        total += x[s:s + chunk].sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros_like(total)
    for s in range(0, n, chunk):
        d = x[s:s + chunk] - mean
        sq += np.einsum("ij,ij->j", d, d)
    return mean, np.sqrt(sq / max(n, 1))


def _raw_inputs(features: np.ndarray, age: np.ndarray, sex: np.ndarray, age_sex: bool, encoding: str,
                age_fill: float) -> np.ndarray:
    if not age_sex:
        return features
    demo = demographics(age, sex, encoding, age_fill)
    out = np.empty((len(features), features.shape[1] + demo.shape[1]), dtype=np.float32)
    out[:, : features.shape[1]] = features
    out[:, features.shape[1]:] = demo
    return out


def fit_inputs(train: SplitData, feature_dims: list[int], age_sex: bool = False,
               sex_encoding: str = "indicator") -> InputSpec:
    """Standardization statistics from the train split only (val/test never leak into them)."""
    known = train.age[~np.isnan(train.age)]
    age_fill = float(known.mean()) if known.size else 0.0
    raw = _raw_inputs(train.features, train.age, train.sex, age_sex, sex_encoding, age_fill)
    mean, std = _column_moments(raw)
    std = np.where(std < 1e-6, 1.0, std)  # a constant column stays constant instead of dividing by 0
    return InputSpec(list(feature_dims), age_sex, sex_encoding, age_fill, mean.astype(np.float32),
                     std.astype(np.float32))


def make_inputs(features: np.ndarray, age: np.ndarray, sex: np.ndarray, spec: InputSpec,
                chunk: int = 16384) -> np.ndarray:
    """(n, spec.width) float32 standardized inputs; a new array, the store's arrays are untouched."""
    if features.shape[1] != sum(spec.feature_dims):
        raise StoreError(f"inputs: features are {features.shape[1]} wide, the head expects {sum(spec.feature_dims)}")
    raw = _raw_inputs(features, age, sex, spec.age_sex, spec.sex_encoding, spec.age_fill)
    out = raw.astype(np.float32, copy=True) if raw is features else raw
    for s in range(0, len(out), chunk):  # in place, chunked: no second full-size temporary
        block = out[s:s + chunk]
        block -= spec.mean
        block /= spec.std
    return out
