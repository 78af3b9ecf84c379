"""Do features carry anything? Per-split spread and distinct rows, for the manifest and the trainers.

A backbone that outputs (near-)constant features (e.g. a randomly initialised MobileNet gives
values around 1e-10, one distinct row in hundreds) makes every head score exactly 0.5; the
numbers look like a result and are not. Extraction records these figures per split and warns;
heads.train refuses a constant training split.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Real pooled CNN features spread by ~0.01-1 per dimension; below this every dimension is flat.
FLAT_STD = 1e-6


class RunningStats:
    """Mean and M2 per dimension merged batch by batch and part by part (Chan et al.), plus row digests: each
    compaction task summarizes the rows it writes, and the driver merges the parts without reading them again."""

    def __init__(self, width: int):
        self.n, self.mean, self.m2 = 0, np.zeros(width), np.zeros(width)
        self.digests: set[bytes] = set()

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if not n:
            return
        delta, total = mean - self.mean, self.n + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total

    def add(self, x: np.ndarray, batch_rows: int = 4096) -> RunningStats:
        for start in range(0, len(x), batch_rows):  # float64 copies of a batch, not of a whole file
            batch = np.asarray(x[start:start + batch_rows], dtype=np.float64)
            mean = batch.mean(axis=0)
            self._merge(len(batch), mean, ((batch - mean) ** 2).sum(axis=0))
            rows = np.ascontiguousarray(batch.astype(np.float32))
            self.digests.update(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows)
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        self._merge(other.n, other.mean, other.m2)
        self.digests |= other.digests
        return self

    def summary(self) -> dict:
        if self.n == 0:
            return {"rows": 0, "distinct_rows": 0, "mean_std": None, "max_std": None}
        std = np.sqrt(self.m2 / self.n)
        return {"rows": self.n, "distinct_rows": len(self.digests),
                "mean_std": float(std.mean()), "max_std": float(std.max())}


def summarize(features: np.ndarray) -> dict:
    """rows, distinct_rows, mean_std and max_std (population std per dimension) of an (n, d) array."""
    return RunningStats(features.shape[1]).add(features).summary()


def is_constant(stats: dict) -> bool:
    return stats["rows"] > 1 and (stats["distinct_rows"] <= 1 or stats["max_std"] < FLAT_STD)


def constant_note(split: str, stats: dict) -> str | None:
    """A warning line when a split's features carry nothing; None when they spread."""
    if not is_constant(stats):
        return None
    return (f"{split}: features are constant ({stats['distinct_rows']} distinct of {stats['rows']} rows, largest "
            f"per-dimension std {stats['max_std']:.2g}); a head trained on them learns nothing (random weights?)")
