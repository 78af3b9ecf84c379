"""Image/mask pairs for lung segmentation: pairing by file stem, decoding, augmentation.

Pairs are matched by file stem in two folders (any suffix common.data.locate accepts), so
`images/CHNCXR_0001_0.png` pairs with `masks/CHNCXR_0001_0.png` or `.jpg`. Images decode with
common.images.decode to gray [0, 1]; masks of 0/255 or 0/1 are binarized at half their range. Everything
is resized to the model's square size (the Shenzhen set is already square; a non-square image is
stretched, as the set's own 512 px copies were).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common.images.decode import decode_gray, to_unit_array
from common.data.locate import is_image_file, walk_files
from lungs.hardfilms import portable

SPLITS = ("train", "val", "test")


@dataclass
class Pairs:
    stems: list[str]  # sorted
    images: dict[str, str]  # stem -> path
    masks: dict[str, str]
    unpaired: list[str] = field(default_factory=list)  # one line each: which side lacks what


def _by_stem(folder: str | Path, flag: str) -> tuple[dict[str, str], list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: not a folder")
    found, dupes = {}, []
    for entry in walk_files(folder):
        if is_image_file(entry):
            stem = Path(entry.name).stem
            if stem in found:
                dupes.append(f"{flag}: {entry.path}: a second file of stem {stem!r} (kept {found[stem]})")
            else:
                found[stem] = entry.path
    return found, dupes


def pair_files(images_dir: str | Path, masks_dir: str | Path) -> Pairs:
    """Image and mask files matched by stem; images without a mask (and masks without an image) are listed."""
    images, notes = _by_stem(images_dir, "--images")
    masks, more = _by_stem(masks_dir, "--masks")
    notes += more
    notes += [f"{images[s]}: no mask of stem {s!r} in {masks_dir}" for s in sorted(images.keys() - masks.keys())]
    notes += [f"{masks[s]}: no image of stem {s!r} in {images_dir}" for s in sorted(masks.keys() - images.keys())]
    stems = sorted(images.keys() & masks.keys())
    if not stems:
        raise FileNotFoundError(f"--images {images_dir} / --masks {masks_dir}: no image and mask share a file stem")
    return Pairs(stems, images, masks, notes)


def read_image(path: str, size: int) -> np.ndarray:
    gray, scale = decode_gray(path, size)
    return to_unit_array(gray.resize((size, size), Image.Resampling.BILINEAR), scale)


def read_mask(path: str, size: int) -> np.ndarray:
    """(size, size) bool: a 0/1 mask is taken as it is, anything else at half of its value range."""
    gray, scale = decode_gray(path, size)
    raw = np.asarray(gray, dtype=np.float32)
    unit = raw if raw.max() <= 1.0 else raw * np.float32(scale)
    resized = Image.fromarray(unit, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 0.5


@dataclass
class Loaded:
    stems: list[str]
    images: np.ndarray  # (N, S, S) float32 [0, 1]
    masks: np.ndarray  # (N, S, S) bool
    skipped: list[str]  # one line per corrupt pair


def load_pairs(pairs: Pairs, stems: list[str], size: int, log=print) -> Loaded:
    """Decode the pairs of `stems`; a pair whose image or mask cannot be read is reported and skipped."""
    kept, images, masks, skipped = [], [], [], []
    for stem in stems:
        try:
            image, mask = read_image(pairs.images[stem], size), read_mask(pairs.masks[stem], size)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file
            line = f"{stem}: skipped, cannot decode ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            skipped.append(line)
            log(line)
            continue
        kept.append(stem)
        images.append(image)
        masks.append(mask)
    shape = (0, size, size)
    return Loaded(kept, np.stack(images) if images else np.zeros(shape, np.float32),
                  np.stack(masks) if masks else np.zeros(shape, bool), skipped)


def film_looks(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, p: float):
    """Each (S, S) image, with probability `p`, through lungs.hardfilms.portable (a crop or rotation, opacities,
    tubes, text and arrows, low resolution, contrast extremes, each with its own probability), its mask alike."""
    images, masks = images.copy(), masks.copy()
    for k in range(len(images)):
        if rng.uniform() < p:
            images[k], masks[k] = portable(images[k], masks[k], rng)
    return images, masks


def augment(images, masks, generator, flip: bool = False, rotate: float = 10.0, scale=(0.9, 1.1),
            shift: float = 0.06, brightness: float = 0.1, contrast: float = 0.2, gamma: float = 0.25,
            films: float = 0.0):
    """Random radiograph-like variation of a batch: images (N,1,S,S) float [0,1], masks (N,1,S,S) float 0/1.

    First, with probability `films` per image, a portable film's look (film_looks: drawn from a
    generator seeded by `generator`, so a run repeats). Geometry (one affine per image, applied to
    both): rotation up to ±`rotate` degrees, isotropic scale in `scale`, shift up to `shift` of the
    side; never a vertical flip, a horizontal one only when asked. Intensity (image only): gamma,
    contrast about the mean, brightness, so that another hospital's exposure and processing look familiar.
    """
    import torch
    from torch.nn import functional as F

    n, device = images.shape[0], images.device
    if films > 0:
        rng = np.random.default_rng(int(torch.randint(2 ** 31 - 1, (1,), generator=generator)))
        looked, moved = film_looks(images[:, 0].cpu().numpy(), masks[:, 0].cpu().numpy() >= 0.5, rng, films)
        images = torch.from_numpy(looked)[:, None].to(device)
        masks = torch.from_numpy(moved.astype(np.float32))[:, None].to(device)

    def uniform(lo, hi):
        return torch.rand(n, generator=generator).mul(hi - lo).add(lo).to(device)

    angle = uniform(-rotate, rotate) * (np.pi / 180)
    s = 1.0 / uniform(*scale)  # the grid samples the input: a smaller grid enlarges
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    sign = torch.ones(n, device=device)
    if flip:
        sign = torch.where(uniform(0, 1) < 0.5, -sign, sign)
    theta = torch.stack([torch.stack([cos * sign, -sin, uniform(-shift, shift) * 2], 1),
                         torch.stack([sin * sign, cos, uniform(-shift, shift) * 2], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()

    g = torch.exp(uniform(-gamma, gamma)).view(n, 1, 1, 1)
    images = images.clamp(0, 1) ** g
    mean = images.mean(dim=(2, 3), keepdim=True)
    images = (images - mean) * (1 + uniform(-contrast, contrast)).view(n, 1, 1, 1) + mean
    images = images + uniform(-brightness, brightness).view(n, 1, 1, 1)
    return images.clamp(0, 1), masks
