"""Lung-masked model inputs (LeDNet): the pure step the extraction job will run per batch.

The mask is predicted on the backbone's own input (its DataConfig geometry), resized to the lung
model's size, so the masked image and the original one share one field of view and one
preprocessing; the mask comes back to the input's size and everything outside it turns black.
Each image also gets its lung fraction and QA flags for masks that look wrong; such images are
kept and flagged, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from lungs.model import predict_masks
from lungs.postprocess import postprocess

# Both lungs of an adult frontal film cover roughly 15-45% of a padded square input; far outside
# that a mask is more likely wrong than the anatomy unusual.
MIN_FRACTION, MAX_FRACTION = 0.05, 0.65
QA_FLAGS = ("empty", "one_region", "too_small", "too_large")


@dataclass
class Masked:
    images: np.ndarray  # (N, S, S) float32 in [0, 1]: the inputs with everything outside the lungs black
    masks: np.ndarray  # (N, S, S) bool, at the input's size
    lung_fraction: np.ndarray  # (N,) float32: share of the input that is lung
    qa: list[list[str]]  # per image, the QA_FLAGS that apply (empty list: looks right)
    fired: dict  # post-processing step -> how many images it changed


def qa_flags(mask: np.ndarray) -> list[str]:
    """What looks wrong with one mask (see QA_FLAGS)."""
    fraction = float(mask.mean())
    if fraction == 0:
        return ["empty"]
    flags = []
    if ndimage.label(mask)[1] == 1:
        flags.append("one_region")
    if fraction < MIN_FRACTION:
        flags.append("too_small")
    if fraction > MAX_FRACTION:
        flags.append("too_large")
    return flags


def mask_inputs(model, size: int, images: np.ndarray, **steps) -> Masked:
    """(N, S, S) model inputs in [0, 1] -> the masked inputs, their masks, lung fractions and QA flags.

    `model` is lungs.model.load_lung_model's, `size` its config["size"]; `steps` switch the
    post-processing steps (keep, fill, mirror) as lungs.postprocess.postprocess takes them.
    """
    images = np.asarray(images, dtype=np.float32)
    n, s = len(images), images.shape[-1]
    x = torch.from_numpy(images)[:, None]
    small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]
    raw = predict_masks(model, small.clamp(0, 1).numpy())
    cleaned, fired = [], {}
    for m in raw:
        out, did = postprocess(m, **steps)
        cleaned.append(out)
        for step, f in did.items():
            fired[step] = fired.get(step, 0) + int(f)
    masks_small = torch.from_numpy(np.stack(cleaned) if cleaned else np.zeros((0, size, size), bool))
    # Back to the input's size: bilinear on the 0/1 mask, then >= 0.5, keeps its edges where they were.
    masks = (F.interpolate(masks_small[:, None].float(), size=(s, s), mode="bilinear", align_corners=False)[:, 0]
             >= 0.5).numpy()
    return Masked(images * masks, masks, masks.reshape(n, -1).mean(axis=1).astype(np.float32),
                  [qa_flags(m) for m in masks], fired)


# The columns a masked store adds to the contract's, and their Spark types.
COLUMNS = ("lung_fraction", "lung_qa")
COLUMNS_DDL = "lung_fraction float, lung_qa string"
QA_RULE = (f"empty: no lung pixel; one_region: a single connected region; too_small / too_large: lung "
           f"fraction under {MIN_FRACTION:g} / over {MAX_FRACTION:g}; flagged images are kept")
POSTPROCESS = ("keep", "fill", "mirror")


def lung_model_source(name: str) -> dict:
    """--lung-model -> {path, label, sha256, size, postprocess}, read on the driver so a bad file fails first."""
    from common.weights import file_sha256
    from lungs.model import DEFAULT, read_lung_checkpoint

    path = DEFAULT if name == "default" else name
    obj = read_lung_checkpoint(path)  # one-line LungModelError for a missing or foreign file
    return {"path": str(path), "label": "default" if name == "default" else f"checkpoint:{path}",
            "sha256": file_sha256(str(path)), "size": obj["config"]["size"], "postprocess": list(POSTPROCESS)}


class LungMasker:
    """The extraction job's input transform for `--view masked` (common.extraction's `transform`):
    a batch of backbone inputs -> the masked batch and, per image, lung_fraction and lung_qa
    (comma-separated QA_FLAGS, null when the mask looks right)."""

    columns = COLUMNS

    def __init__(self, path: str, device: str = "cpu"):
        from lungs.model import load_lung_model

        self.model, config = load_lung_model(path, device)
        self.size = config["size"]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, dict]:
        out = mask_inputs(self.model, self.size, images)
        return out.images, {"lung_fraction": [float(f) for f in out.lung_fraction],
                            "lung_qa": [",".join(flags) or None for flags in out.qa]}


_MASKERS: dict[tuple, LungMasker] = {}


def cached_masker(path: str, device: str) -> LungMasker:
    """One lung model per Python worker process, as the backbone (common.extraction.cached_extractor)."""
    key = (path, device)
    if key not in _MASKERS:
        _MASKERS.clear()
        _MASKERS[key] = LungMasker(path, device)
    return _MASKERS[key]
