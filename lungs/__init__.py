"""Lung segmentation: a compact U-Net, its data, metrics, post-processing, training and evaluation."""
