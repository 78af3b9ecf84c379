"""Lung-masked model inputs (LeDNet): the pure step the extraction job runs per batch.

The lung model sees the film at its own size (what it was trained on, 256 px for the shipped one)
in the backbone's geometry (its DataConfig with the lung model's input size: `LungMasker.view`),
so the masked image and the original one share one field of view and one preprocessing whatever
the backbone's input size; the mask comes to the backbone's input size and everything outside it
turns black. Each image also gets its lung fraction and QA flags for masks that look wrong; such
images are kept and flagged, never dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from common.atomic import atomic_path
from lungs.model import predict_masks
from lungs.postprocess import postprocess

# Both lungs of an adult frontal film cover roughly 15-45% of a padded square input; far outside
# that a mask is more likely wrong than the anatomy unusual.
MIN_FRACTION, MAX_FRACTION = 0.05, 0.65
QA_FLAGS = ("empty", "one_region", "too_small", "too_large")
QA_OK = "ok"  # lung_qa of a mask with no flag
# Real frontal films are flagged a few in a hundred (5 of 420 NIH films); many more means the
# lung model does not suit these images.
HIGH_FLAG_RATE = 0.2


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


def mask_inputs(model, images: np.ndarray, views: np.ndarray, **steps) -> Masked:
    """(N, S, S) backbone inputs in [0, 1] and (N, L, L) the same films as the lung model's input (`LungMasker.view`)
    -> the masked inputs, their masks at S, lung fractions and QA flags.

    `model` is lungs.model.load_lung_model's; `steps` switch the post-processing steps (keep, fill, mirror)
    as lungs.postprocess.postprocess takes them.
    """
    images = np.asarray(images, dtype=np.float32)
    n, s, size = len(images), images.shape[-1], views.shape[-1]
    raw = predict_masks(model, np.asarray(views, dtype=np.float32))
    cleaned, fired = [], {}
    for m in raw:
        out, did = postprocess(m, **steps)
        cleaned.append(out)
        for step, f in did.items():
            fired[step] = fired.get(step, 0) + int(f)
    masks_small = torch.from_numpy(np.stack(cleaned) if cleaned else np.zeros((0, size, size), bool))
    # To the input's size: the 0/1 mask resized bilinearly (averaged over each input pixel when shrinking),
    # then >= 0.5, keeps its edges where they were.
    masks = (F.interpolate(masks_small[:, None].float(), size=(s, s), mode="bilinear", align_corners=False,
                           antialias=True)[:, 0] >= 0.5).numpy()
    return Masked(images * masks, masks, masks.reshape(n, -1).mean(axis=1).astype(np.float32),
                  [qa_flags(m) for m in masks], fired)


# The columns a masked store adds to the contract's (their Arrow types: common.features.store.MASKED_FIELDS).
COLUMNS = ("lung_fraction", "lung_qa")
QA_RULE = (f"empty: no lung pixel; one_region: a single connected region; too_small / too_large: lung "
           f"fraction under {MIN_FRACTION:g} / over {MAX_FRACTION:g}; {QA_OK}: none of these; flagged images are kept")
POSTPROCESS = ("keep", "fill", "mirror")


def lung_model_source(name: str) -> dict:
    """--lung-model -> {path, label, sha256, size, postprocess}, read on the driver so a bad file fails first."""
    from common.models.weights import file_sha256
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
        with atomic_path(folder / mask_file_name(str(image_id))) as tmp:
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def qa_summary(counts: dict[str, int]) -> tuple[str, str | None]:
    """A masked store's QA counts (lung_qa -> images; null from older stores counted as ok) as one line, and a
    warning when more than HIGH_FLAG_RATE of the masks are flagged (else None)."""
    total, ok = sum(counts.values()), counts.get(QA_OK, 0)
    line = ", ".join(f"{qa} {n}" for qa, n in sorted(counts.items(), key=lambda c: (c[0] != QA_OK, -c[1], c[0])))
    flagged = total - ok
    if not total or flagged / total <= HIGH_FLAG_RATE:
        return line or "no images", None
    return line, (f"{flagged} of {total} lung masks ({flagged / total:.0%}) are flagged: the lung model may not "
                  "suit these images; look at their masks (--save-masks) before training on them")


class LungMasker:
    """The extraction job's input transform for `--view masked` (common.features.extraction's `transform`):
    a batch of backbone inputs, their image ids and the same films as the lung model's input (`view`)
    -> the masked batch and, per image, lung_fraction and lung_qa (comma-separated QA_FLAGS, or "ok").
    With `masks_dir` it also writes each mask there (save_masks)."""

    columns = COLUMNS

    def __init__(self, path: str, device: str = "cpu", masks_dir: str | None = None):
        from lungs.model import load_lung_model

        self.model, config = load_lung_model(path, device)
        self.size = config["size"]
        self.masks_dir = masks_dir

    def view(self, data_config):
        """The lung model's input of a film: the backbone's geometry (common.images.data_config.DataConfig) at the lung
        model's own size, whatever the backbone's input size."""
        return dataclasses.replace(data_config, input_size=self.size)

    def __call__(self, images: np.ndarray, image_ids, views: np.ndarray) -> tuple[np.ndarray, dict]:
        out = mask_inputs(self.model, images, views)
        if self.masks_dir:
            save_masks(self.masks_dir, image_ids, out.masks)
        return out.images, {"lung_fraction": [float(f) for f in out.lung_fraction],
                            "lung_qa": [",".join(flags) or QA_OK for flags in out.qa]}
