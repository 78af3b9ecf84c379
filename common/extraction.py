"""The work inside one Spark task, as pure functions: rows in, feature rows out.

Each image is decoded on its own (a bad file becomes an error row, never an exception), the good
ones are batched through the frozen backbone, and every input row comes out exactly once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from common.data_config import DataConfig
from common.images import MAX_PIXELS
from common.inference import FeatureExtractor

# Columns the task receives, and what it returns: the store's row columns + split + path + error.
INPUT_DDL = (
    "image_id string, patient_id string, view string, age float, sex tinyint, "
    "labels array<tinyint>, split string, path string"
)
INPUT_COLUMNS = tuple(part.split()[0] for part in INPUT_DDL.split(", "))
OUTPUT_COLUMNS = ("image_id", "patient_id", "view", "age", "sex", "labels", "features", "split", "path", "error")

_EXTRACTORS: dict[tuple, FeatureExtractor] = {}


def cached_extractor(backbone: str, state_file: str | None, seed: int, device: str, precision: str,
                     threads: int, data_config: DataConfig) -> FeatureExtractor:
    """One model per Python worker process: Spark reuses workers, so later tasks skip the build."""
    key = (backbone, state_file, seed, device, precision, threads, data_config)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()  # a worker serves one job's settings; free the old model first
        _EXTRACTORS[key] = FeatureExtractor(backbone, state_file, seed, device=device, precision=precision,
                                            threads=threads, data_config=data_config)
    return _EXTRACTORS[key]


def decode(load: Callable[[str], np.ndarray], path: str) -> tuple[np.ndarray | None, str | None]:
    """(image, None), or (None, a one-line error) for a file `load` cannot read."""
    try:
        return load(path), None
    except Exception as exc:  # any decoder failure is data, recorded per image
        message = " ".join(str(exc).split())
        return None, f"{type(exc).__name__}: {message}"[:500]


def extract_frame(rows: pd.DataFrame, extractor: FeatureExtractor, pool: ThreadPoolExecutor | None = None,
                  max_pixels: int = MAX_PIXELS, transform=None) -> pd.DataFrame:
    """Decode and embed one batch of rows; failed images get `error` and null features.

    `transform` (e.g. lungs.masking.LungMasker) changes the decoded inputs before the backbone:
    called on the (n, S, S) batch and its image ids it returns the new batch and a list per name in its `columns`,
    which become extra output columns (null for rows that failed)."""
    paths = rows["path"].tolist()
    loads = [partial(extractor.data_config.load, max_pixels=max_pixels)] * len(paths)
    decoded = list(pool.map(decode, loads, paths) if pool else map(decode, loads, paths))
    ok = [i for i, (image, _) in enumerate(decoded) if image is not None]
    features: list = [None] * len(rows)
    errors = [error for _, error in decoded]
    extra = {name: [None] * len(rows) for name in (transform.columns if transform else ())}
    if ok:
        images = np.stack([decoded[i][0] for i in ok])
        if transform is not None:
            images, columns = transform(images, [rows["image_id"].iloc[i] for i in ok])
            for name, values in columns.items():
                for row, value in zip(ok, values):
                    extra[name][row] = value
        batch = extractor(images)
        for row, vector in zip(ok, batch):
            if np.isfinite(vector).all():
                features[row] = vector
            else:  # a store never holds NaN/Inf: the image is an error, the job goes on
                errors[row] = f"non-finite features: {int((~np.isfinite(vector)).sum())} NaN/Inf values from the backbone"
    out = rows.reset_index(drop=True).copy()
    out["features"] = features
    out["error"] = errors
    for name, values in extra.items():
        out[name] = values
    return out[[*OUTPUT_COLUMNS, *extra]]


def iter_extract(frames: Iterable[pd.DataFrame], extractor: FeatureExtractor, batch_size: int, max_pixels: int = MAX_PIXELS,
                 transform=None, decode_threads: int = 1,
                 on_batch: Callable[[int, int], None] | None = None) -> Iterator[pd.DataFrame]:
    """Re-batch Arrow batches of any size into model batches of `batch_size` rows."""
    pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None
    try:
        for frame in frames:
            for start in range(0, len(frame), batch_size):
                out = extract_frame(frame.iloc[start:start + batch_size], extractor, pool, max_pixels, transform)
                if on_batch:
                    n_errors = int(out["error"].notna().sum())
                    on_batch(len(out) - n_errors, n_errors)
                yield out
    finally:
        if pool:
            pool.shutdown()
