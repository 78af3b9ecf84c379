"""Do features carry anything? Per-split spread and distinct rows, for the manifest and the trainers.

A backbone that outputs (near-)constant features (e.g. a randomly initialised MobileNet gives
values around 1e-10, one distinct row in hundreds) makes every head score exactly 0.5; the
numbers look like a result and are not. Extraction records these figures per split and warns;
heads.train refuses a constant training split.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq

from common import fs

# Real pooled CNN features spread by ~0.01-1 per dimension; below this every dimension is flat.
FLAT_STD = 1e-6


class _Running:
    """Mean and M2 per dimension merged batch by batch (Chan et al.), plus row digests."""

    def __init__(self, width: int):
        self.n, self.mean, self.m2 = 0, np.zeros(width), np.zeros(width)
        self.digests: set[bytes] = set()

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x = np.asarray(x, dtype=np.float64)
        n, mean = len(x), x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        delta, total = mean - self.mean, self.n + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total
        rows = np.ascontiguousarray(x.astype(np.float32))
        self.digests.update(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows)

    def summary(self) -> dict:
        if self.n == 0:
            return {"rows": 0, "distinct_rows": 0, "mean_std": None, "max_std": None}
        std = np.sqrt(self.m2 / self.n)
        return {"rows": self.n, "distinct_rows": len(self.digests),
                "mean_std": float(std.mean()), "max_std": float(std.max())}


def summarize(features: np.ndarray) -> dict:
    """rows, distinct_rows, mean_std and max_std (population std per dimension) of an (n, d) array."""
    running = _Running(features.shape[1])
    running.add(features)
    return running.summary()


def summarize_parquet(files: list[str], width: int, column: str = "features", batch_rows: int = 4096) -> dict:
    """`summarize` of a list column of Parquet files (paths or URIs), streamed in batches (a store split can be GBs)."""
    running = _Running(width)
    for file in files:
        filesystem, where = fs.resolve(file)
        with filesystem.open_input_file(where) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[column]):
                flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                running.add(flat.reshape(-1, width))
    return running.summary()


def is_constant(stats: dict) -> bool:
    return stats["rows"] > 1 and (stats["distinct_rows"] <= 1 or stats["max_std"] < FLAT_STD)


def constant_note(split: str, stats: dict) -> str | None:
    """A warning line when a split's features carry nothing; None when they spread."""
    if not is_constant(stats):
        return None
    return (f"{split}: features are constant ({stats['distinct_rows']} distinct of {stats['rows']} rows, largest "
            f"per-dimension std {stats['max_std']:.2g}); a head trained on them learns nothing (random weights?)")
