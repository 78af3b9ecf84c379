"""Portable-film look-alikes made from PA films with lung masks: seeded, deterministic, mask kept aligned.

Shenzhen's films are adult PA studies from one hospital; the lung model is also used on portable AP
films of very sick patients and on figures cut from papers. Each transform here imitates one of
their traits on an image in [0, 1] with its mask, so Dice can be measured where no such masks exist:

    contrast  gamma and contrast extremes (an over- or under-exposed bedside film), noise
    opacity   bright soft blobs inside the lung field, up to a whited-out lung (the mask stays the lung)
    lines     tubes, lines and wires: bright curves of a few pixels, some across the lungs
    text      burned-in letters and arrows, as in a figure or a portable study's labels
    crop      a rotated (up to 20 degrees), zoomed and off-center view; the mask moves alike
    lowres    the film at 20-40 % of its side, blurred, then brought back to size
    portable  all of the above, each with a probability: the hardest set

`make(image, mask, kind, rng)` transforms one pair; `hard_set(images, masks, kind, seed)` a stack,
image k drawn from the generator seeded by (seed, k), so a set is the same on every machine.
lungs.data.augment uses the same functions, each with a probability, to train on such films.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

KINDS = ("contrast", "opacity", "lines", "text", "crop", "lowres", "portable")


def contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma far from 1 either way, contrast squeezed or stretched about the mean, a level shift and noise."""
    gamma = np.exp(rng.choice([-1, 1]) * rng.uniform(0.5, 1.0))
    out = np.clip(image, 0, 1) ** gamma
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.35, 1.6) + mean + rng.uniform(-0.2, 0.2)
    out = out + rng.normal(0, rng.uniform(0, 0.04), out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def opacity(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, whiteout: float = 0.3) -> np.ndarray:
    """Soft bright blobs centered on lung pixels; with probability `whiteout` one lung is mostly opaque."""
    side = image.shape[0]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    field = np.zeros_like(image, dtype=np.float32)
    inside = np.argwhere(mask)
    if len(inside) == 0:
        return image
    for _ in range(rng.integers(2, 7)):
        cy, cx = inside[rng.integers(len(inside))]
        sigma = side * rng.uniform(0.03, 0.10)
        field = np.maximum(field, rng.uniform(0.3, 0.8) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)))
    if rng.uniform() < whiteout:
        labels, count = ndimage.label(mask)
        if count:
            lung = labels == rng.integers(1, count + 1)
            soft = ndimage.gaussian_filter(lung.astype(np.float32), side * 0.03)
            field = np.maximum(field, rng.uniform(0.6, 0.9) * soft / max(soft.max(), 1e-6))
    out = image + field * (rng.uniform(0.75, 0.95) - image)  # toward a bright, flat opacity
    return np.clip(out, 0, 1).astype(np.float32)


def _curve(rng: np.random.Generator, side: int, points: int = 40) -> list[tuple[float, float]]:
    """A smooth quadratic Bezier from an edge of the image into (or across) it."""
    p0 = np.array([rng.uniform(0, side), rng.choice([0.0, side * rng.uniform(0, 0.2)])])
    p1 = rng.uniform(0.2, 0.8, 2) * side
    p2 = rng.uniform(0.1, 0.9, 2) * side
    t = np.linspace(0, 1, points)[:, None]
    xy = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return [(float(x), float(y)) for x, y in xy]


def lines(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two to six tubes and wires: bright (a few dark) curves 1-2 % of the side wide."""
    side = image.shape[0]
    canvas = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        level = int(rng.uniform(200, 255)) if rng.uniform() < 0.85 else int(rng.uniform(0, 40))
        draw.line(_curve(rng, side), fill=level, width=max(1, int(side * rng.uniform(0.005, 0.02))))
    return (np.asarray(canvas, np.float32) / 255).astype(np.float32)


def text(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Burned-in labels (letters and digits, 4-9 % of the side high) and arrows, anywhere, some over a lung."""
    side = image.shape[0]
    canvas = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "))
    for _ in range(rng.integers(1, 4)):
        words = "".join(rng.choice(letters, rng.integers(1, 9))).strip() or "L"
        font = ImageFont.load_default(size=max(6, int(side * rng.uniform(0.04, 0.09))))
        xy = (rng.uniform(0, 0.8) * side, rng.uniform(0, 0.9) * side)
        draw.text(xy, words, fill=int(rng.uniform(220, 255)), font=font)
    for _ in range(rng.integers(0, 3)):
        tip = rng.uniform(0.2, 0.8, 2) * side
        angle = rng.uniform(0, 2 * np.pi)
        length = side * rng.uniform(0.08, 0.18)
        tail = tip + length * np.array([np.cos(angle), np.sin(angle)])
        width = max(1, int(side * 0.012))
        draw.line([tuple(tail), tuple(tip)], fill=255, width=width)
        for turn in (0.5, -0.5):  # the head: two short strokes back from the tip
            back = tip + 0.35 * length * np.array([np.cos(angle + turn), np.sin(angle + turn)])
            draw.line([tuple(tip), tuple(back)], fill=255, width=width)
    return (np.asarray(canvas, np.float32) / 255).astype(np.float32)


def crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, max_angle: float = 20.0,
         zoom=(1.0, 1.35), max_shift: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """One affine for both (rotation, zoom about an off-center point): parts of the lungs may leave the frame,
    the border outside the film is black as on a scanned or cropped figure."""
    side = image.shape[0]
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
    scale = rng.uniform(*zoom)
    center = (side - 1) / 2 + rng.uniform(-max_shift, max_shift, 2) * side
    # Output pixel o samples input R(-angle) (o - c0) / scale + center.
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    c0 = np.full(2, (side - 1) / 2)
    offset = center - rot @ c0
    out = ndimage.affine_transform(image, rot, offset=offset, order=1, mode="constant", cval=0.0)
    moved = ndimage.affine_transform(mask.astype(np.float32), rot, offset=offset, order=1, mode="constant") >= 0.5
    return out.astype(np.float32), moved


def lowres(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down to 20-40 % of the side with a blur first, then bilinear back: a small figure or a thumbnail."""
    side = image.shape[0]
    small = max(16, int(side * rng.uniform(0.2, 0.4)))
    blurred = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.5) * side / small / 2)
    down = Image.fromarray(blurred.astype(np.float32), mode="F").resize((small, small), Image.Resampling.BILINEAR)
    return np.asarray(down.resize((side, side), Image.Resampling.BILINEAR), np.float32).clip(0, 1)


def portable(image, mask, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each trait with its own probability, geometry first (artifacts are burned in after the view was cut)."""
    if rng.uniform() < 0.7:
        image, mask = crop(image, mask, rng)
    if rng.uniform() < 0.8:
        image = opacity(image, mask, rng)
    if rng.uniform() < 0.7:
        image = lines(image, rng)
    if rng.uniform() < 0.6:
        image = text(image, rng)
    if rng.uniform() < 0.4:
        image = lowres(image, rng)
    if rng.uniform() < 0.8:
        image = contrast(image, rng)
    return image, mask


def make(image: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (S, S) float [0, 1] image and its bool mask through transform `kind` (one of KINDS)."""
    image, mask = np.asarray(image, np.float32), np.asarray(mask, bool)
    if kind == "crop":
        return crop(image, mask, rng)
    if kind == "portable":
        return portable(image, mask, rng)
    if kind == "opacity":
        return opacity(image, mask, rng), mask
    one = {"contrast": contrast, "lines": lines, "text": text, "lowres": lowres}
    if kind not in one:
        raise ValueError(f"hard film kind {kind!r}: not one of {', '.join(KINDS)}")
    return one[kind](image, rng), mask


def hard_set(images: np.ndarray, masks: np.ndarray, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) images and masks through `kind`, image k with the generator of (seed, k, kind's index)."""
    if kind not in KINDS:
        raise ValueError(f"hard film kind {kind!r}: not one of {', '.join(KINDS)}")
    pairs = [make(im, m, kind, np.random.default_rng([seed, k, KINDS.index(kind)]))
             for k, (im, m) in enumerate(zip(images, masks))]
    if not pairs:
        return np.asarray(images, np.float32), np.asarray(masks, bool)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
