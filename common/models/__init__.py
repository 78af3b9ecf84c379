"""Backbones after timm's layering: the registry of specs, checkpoint files, weights, builders, architectures, the feature extractor."""
