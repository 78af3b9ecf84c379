"""The constant-feature check: figures per split, and the verdict."""

import numpy as np

from common.features.feature_stats import RunningStats, constant_note, is_constant, summarize


def test_spread_features_pass_and_constant_ones_are_flagged():
    rng = np.random.default_rng(0)
    real = rng.normal(0.3, 0.2, (200, 16)).astype(np.float32)
    stats = summarize(real)
    assert stats["rows"] == 200 and stats["distinct_rows"] == 200
    assert abs(stats["mean_std"] - 0.2) < 0.03 and not is_constant(stats) and constant_note("train", stats) is None
    tiny = (1e-10 * (1 + 0.1 * rng.random((50, 16)))).astype(np.float32)  # random-init MobileNet scale
    assert is_constant(summarize(tiny))
    same = np.tile(real[:1], (30, 1))
    stats = summarize(same)
    assert stats["distinct_rows"] == 1 and is_constant(stats)
    assert "train: features are constant (1 distinct of 30 rows" in constant_note("train", stats)
    assert not is_constant(summarize(real[:1]))  # one row says nothing either way


def test_parts_merged_in_batches_equal_in_memory():
    """As compaction computes them: each part (a file) in batches, the parts merged on the driver."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 8)).astype(np.float32) * 1000 + 5e4  # large offset: a naive sum of squares drifts
    x[700] = x[3]  # a repeated row across parts counts once
    parts = [RunningStats(8).add(x[i * 400:(i + 1) * 400], batch_rows=97) for i in range(3)]
    merged = RunningStats(8)
    for part in parts:
        merged.merge(part)
    streamed, direct = merged.summary(), summarize(x)
    assert streamed["rows"] == 1000 and streamed["distinct_rows"] == direct["distinct_rows"]
    np.testing.assert_allclose(streamed["max_std"], x.astype(np.float64).std(axis=0).max(), rtol=1e-9)
    np.testing.assert_allclose(streamed["mean_std"], direct["mean_std"], rtol=1e-9)
