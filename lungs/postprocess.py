"""LeDNet's clean-up of a predicted lung mask; each step can be switched off and says when it fired.

    keep    at most the two connected regions nearest the image center, among those not tiny
            (>= 5 % of the largest): specks, a stomach bubble or a shoulder blob go; a small
            collapsed lung (Shenzhen CHNCXR_0603_1's is 8 % of its partner) stays
    fill    holes inside a lung (binary_fill_holes): a nodule or catheter the net left out
    mirror  when one region is left and it lies on one side, add its mirror image across the
            vertical midline: a lung the net missed (an opaque lung) gets its partner's outline
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

STEPS = ("keep", "fill", "mirror")


def keep_central(mask: np.ndarray, n: int = 2, min_fraction: float = 0.05) -> tuple[np.ndarray, bool]:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask, False
    index = np.arange(1, count + 1)
    areas = ndimage.sum(mask, labels, index)
    centers = np.asarray(ndimage.center_of_mass(mask, labels, index)).reshape(-1, 2)
    middle = (np.asarray(mask.shape) - 1) / 2
    candidates = [i for i in range(count) if areas[i] >= min_fraction * areas.max()]
    nearest = sorted(candidates, key=lambda i: np.hypot(*(centers[i] - middle)))[:n]
    if len(nearest) == count:
        return mask, False
    return np.isin(labels, index[nearest]), True


def mirror_lone(mask: np.ndarray, max_overlap: float = 0.1) -> tuple[np.ndarray, bool]:
    """Only a one-sided lone region: one that crosses the midline (both lungs merged) is left as it is."""
    labels, count = ndimage.label(mask)
    area = mask.sum()
    if count != 1 or area == 0:
        return mask, False
    mirrored = mask[:, ::-1]
    if np.logical_and(mask, mirrored).sum() > max_overlap * area:
        return mask, False
    return mask | mirrored, True


def postprocess(mask, keep: bool = True, fill: bool = True, mirror: bool = True) -> tuple[np.ndarray, dict]:
    """(S, S) bool mask -> the cleaned mask and {step: fired} for each step that ran."""
    out = np.asarray(mask, bool)
    fired = {}
    if keep:
        out, fired["keep"] = keep_central(out)
    if fill:
        filled = ndimage.binary_fill_holes(out)
        fired["fill"] = bool((filled != out).any())
        out = filled
    if mirror:
        out, fired["mirror"] = mirror_lone(out)
    return out, fired


def postprocess_all(masks, **steps) -> tuple[np.ndarray, dict]:
    """A batch of masks and how often each step fired."""
    outs, counts = [], {s: 0 for s in STEPS if steps.get(s, True)}
    for m in masks:
        out, fired = postprocess(m, **steps)
        outs.append(out)
        for s, f in fired.items():
            counts[s] += int(f)
    return (np.stack(outs) if outs else np.asarray(masks, bool)), counts
