"""Clean-up of a predicted lung mask that removes only what is clearly wrong; each step can be switched
off and says when it fired.

    keep    drop specks: regions under 5 % of the largest that lie farther than 3 % of the side from
            every larger region. Every region of lung size stays, however many there are and wherever
            they lie: LeDNet's "two regions nearest the center" rule discarded a real lung when a
            disease, a tube or a crop split one in two or moved it off center (one AP film: Dice
            0.76 -> 0.38), and a small piece beside a lung is most likely lung
    fill    holes inside the mask (a nodule, a catheter, an opacity the net left out), up to a
            quarter of the mask's area: a larger hole is the heart between two lungs joined above
            and below it, not lung
    mirror  when one region is left and it lies on one side, add its mirror image across the
            vertical midline: a lung the net missed (an opaque lung) gets its partner's outline
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

STEPS = ("keep", "fill", "mirror")


def drop_specks(mask: np.ndarray, speck: float = 0.05, near: float = 0.03) -> tuple[np.ndarray, bool]:
    """Regions under `speck` of the largest one's area and more than `near` of the side from every larger
    region go; everything else stays."""
    labels, count = ndimage.label(mask)
    if count < 2:
        return mask, False
    index = np.arange(1, count + 1)
    areas = ndimage.sum(mask, labels, index)
    small = areas < speck * areas.max()
    if not small.any():
        return mask, False
    distance = ndimage.distance_transform_edt(~np.isin(labels, index[~small]))
    nearest = ndimage.minimum(distance, labels, index[small])
    far = index[small][np.asarray(nearest) > near * max(mask.shape)]
    if len(far) == 0:
        return mask, False
    return mask & ~np.isin(labels, far), True


def fill_holes(mask: np.ndarray, max_fraction: float = 0.25) -> tuple[np.ndarray, bool]:
    """Holes enclosed by the mask, each up to `max_fraction` of the mask's area, filled."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask, False
    labels, count = ndimage.label(holes)
    areas = ndimage.sum(holes, labels, np.arange(1, count + 1))
    filled = np.flatnonzero(areas <= max_fraction * mask.sum()) + 1
    if len(filled) == 0:
        return mask, False
    return mask | np.isin(labels, filled), True


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
        out, fired["keep"] = drop_specks(out)
    if fill:
        out, fired["fill"] = fill_holes(out)
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
