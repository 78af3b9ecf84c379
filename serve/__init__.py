"""The diagnosis service: one radiograph in, per-finding probabilities (and heatmaps) out (`python -m serve`)."""
