"""Lung-masked model inputs (LeDNet): the pure step the extraction job will run per batch.

The mask is predicted on the backbone's own input (its DataConfig geometry), resized to the lung
model's size, so the masked image and the original one share one field of view and one
preprocessing; the mask comes back to the input's size and everything outside it turns black.
Each image also gets its lung fraction and QA flags for masks that look wrong; such images are
kept and flagged, never dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

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


# The columns a masked store adds to the contract's (their Arrow types: common.store.MASKED_FIELDS).
COLUMNS = ("lung_fraction", "lung_qa")
QA_RULE = (f"empty: no lung pixel; one_region: a single connected region; too_small / too_large: lung "
           f"fraction under {MIN_FRACTION:g} / over {MAX_FRACTION:g}; flagged images are kept")
POSTPROCESS = ("keep", "fill", "mirror")


def lung_model_source(name: str) -> dict:
    """--lung-model -> {path, label, sha256, size, postprocess}, read on the driver so a bad file fails first."""
    from common.weights import file_sha256
    from lungs.model import lung_model_file, read_lung_checkpoint

    path = lung_model_file(name)
    obj = read_lung_checkpoint(path)  # one-line LungModelError for a missing or foreign file
    return {"path": str(path), "label": "default" if name == "default" else f"checkpoint:{path}",
            "sha256": file_sha256(str(path)), "size": obj["config"]["size"], "postprocess": list(POSTPROCESS)}


# A saved mask keeps its image id as its name when the id is a plain lower-case PNG name (NIH's).
_PLAIN_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,99}\.png")


def mask_file_name(image_id: str) -> str:
    """The PNG name of an image's saved mask, one per id by construction, also on a case-insensitive file
    system: the id itself when it is a plain lower-case PNG name (00000001_000.png), else its safe characters,
    '~' and a hash of the whole id (chest.jpg~<16 hex>.png, CHNCXR_0001_0.png~<16 hex>.png). Plain names
    have no '~', so no hashed name is another id's plain name, and ids that differ only by extension, case,
    folder or odd characters get different hashes; no name can escape the folder."""
    if _PLAIN_NAME.fullmatch(image_id):
        return image_id
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", image_id).strip("._")[:100]
    return f"{safe}~{hashlib.sha256(image_id.encode()).hexdigest()[:16]}.png"


def save_masks(folder: str | os.PathLike, image_ids, masks: np.ndarray) -> None:
    """Write each mask as a 0/255 PNG in the backbone's input geometry; each file appears whole
    (written beside, then renamed), so a killed task leaves no half-written mask and a rerun
    simply replaces them."""
    from PIL import Image

    folder = Path(folder)
    for image_id, mask in zip(image_ids, masks):
        final = folder / mask_file_name(str(image_id))
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, final)


class LungMasker:
    """The extraction job's input transform for `--view masked` (common.extraction's `transform`):
    a batch of backbone inputs and their image ids -> the masked batch and, per image,
    lung_fraction and lung_qa (comma-separated QA_FLAGS, null when the mask looks right).
    With `masks_dir` it also writes each mask there (save_masks)."""

    columns = COLUMNS

    def __init__(self, path: str, device: str = "cpu", masks_dir: str | None = None):
        from lungs.model import load_lung_model

        self.model, config = load_lung_model(path, device)
        self.size = config["size"]
        self.masks_dir = masks_dir

    def __call__(self, images: np.ndarray, image_ids) -> tuple[np.ndarray, dict]:
        out = mask_inputs(self.model, self.size, images)
        if self.masks_dir:
            save_masks(self.masks_dir, image_ids, out.masks)
        return out.images, {"lung_fraction": [float(f) for f in out.lung_fraction],
                            "lung_qa": [",".join(flags) or None for flags in out.qa]}


_MASKERS: dict[tuple, LungMasker] = {}


def cached_masker(path: str, device: str, masks_dir: str | None = None) -> LungMasker:
    """One lung model per Python worker process, as the backbone (common.extraction.cached_extractor)."""
    key = (path, device)
    if key not in _MASKERS:
        _MASKERS.clear()
        _MASKERS[key] = LungMasker(path, device)
    _MASKERS[key].masks_dir = masks_dir  # where masks go is a job setting, not part of the model
    return _MASKERS[key]
