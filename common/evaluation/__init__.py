"""Scoring runs: metrics, bootstrap intervals, per-split scores, published baselines, reports, comparisons."""
