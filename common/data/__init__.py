"""Datasets as tables: the dataset registry, each kind's metadata reader, labels, targets, splits, boxes, locating images."""
