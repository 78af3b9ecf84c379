"""PNG decode + resize of the real 1024-px NIH images on one core: Pillow (the reference) beside
OpenCV, pyspng, torchvision.io and imagecodecs, measured side by side in one run.

    .venv/bin/python bench/decoders.py [--images DIR] [--size 224] [--passes 3] [--limit N]

Every candidate reads the file, decodes it, makes the gray image and resizes it to size x size,
then scales to [0, 1]; all but "OpenCV + INTER_AREA" hand the decoded pixels to Pillow for the
gray conversion and the bilinear resize, as DataConfig.load does. Calls are interleaved (each image
through every candidate in turn, order rotated) so that load from other processes hits all alike; the
median of the passes is reported, with each candidate's largest |difference| from Pillow's result.
Then the whole DataConfig(size).load with the adopted decoder (common.images.decode.FAST_PNG) against
forced Pillow, and where Pillow's own time goes (decode, to float, resize).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from common.images import decode as images  # noqa: E402
from common.images.data_config import DataConfig  # noqa: E402
from common.images.decode import to_unit_array  # noqa: E402

NIH_IMAGES = REPO.parent / "shared" / "data" / "nih" / "images"
BILINEAR = Image.Resampling.BILINEAR


def _gray_from_rgb_order(pixels: np.ndarray) -> tuple[Image.Image, float]:
    """Decoded pixels in RGB(A) order (or gray) -> Pillow's mode 'F' gray and scale, as Pillow converts."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        return Image.fromarray(pixels).convert("F"), 1 / (65535 if pixels.dtype == np.uint16 else 255)
    if pixels.shape[2] == 2:  # gray + alpha
        return Image.fromarray(np.ascontiguousarray(pixels[..., 0])).convert("F"), 1 / 255
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3])).convert("L").convert("F"), 1 / 255


def _resized(gray: Image.Image, scale: float, size: int) -> np.ndarray:
    return to_unit_array(gray.resize((size, size), BILINEAR), scale)


def _optional(name: str):
    """The module, or None where it is not installed (it is then reported, not measured)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def candidates(size: int) -> dict[str, object]:
    """name -> path -> (size, size) float32 in [0, 1], or a string saying why it is missing."""
    out: dict[str, object] = {}

    def pillow(path):
        images.FAST_PNG = False
        try:
            return _resized(*images.decode_gray(path, size), size)
        finally:
            images.FAST_PNG = images.cv2 is not None

    out["Pillow (today)"] = pillow
    try:
        import cv2
    except ImportError:
        out["OpenCV imdecode + Pillow resize"] = out["OpenCV imdecode + INTER_AREA"] = "not installed"
    else:
        cv2.setNumThreads(1)

        def cv2_decode(path):
            return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)

        def cv2_pillow(path):
            pixels = cv2_decode(path)
            if pixels.ndim == 3:
                pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
            return _resized(*_gray_from_rgb_order(pixels), size)

        def cv2_area(path):
            pixels = cv2_decode(path)
            scale = 1 / (65535 if pixels.dtype == np.uint16 else 255)
            if pixels.ndim == 3:
                pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY if pixels.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
            small = cv2.resize(pixels.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
            return np.clip(small * np.float32(scale), 0, 1)

        out["OpenCV imdecode + Pillow resize"] = cv2_pillow
        out["OpenCV imdecode + INTER_AREA"] = cv2_area
    pyspng, tvio, imagecodecs = (_optional(name) for name in ("pyspng", "torchvision.io", "imagecodecs"))

    def torchvision(path):
        # UNCHANGED keeps palette indices (no palette): fine for NIH's gray and RGBA files only.
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        pixels = tvio.decode_png(data, tvio.ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy()
        return _resized(*_gray_from_rgb_order(pixels), size)

    out["pyspng + Pillow resize"] = (lambda path: _resized(
        *_gray_from_rgb_order(pyspng.load(Path(path).read_bytes())), size)) if pyspng else "not installed"
    out["torchvision.io.decode_png + Pillow resize"] = torchvision if tvio else "not installed"
    out["imagecodecs.png_decode + Pillow resize"] = (lambda path: _resized(
        *_gray_from_rgb_order(imagecodecs.png_decode(Path(path).read_bytes())), size)) if imagecodecs else "not installed"

    config = DataConfig(size)

    def load(fast):
        def run(path):
            images.FAST_PNG = fast and images.cv2 is not None
            try:
                return config.load(path)
            finally:
                images.FAST_PNG = images.cv2 is not None
        return run

    out[f"DataConfig({size}).load, forced Pillow"] = load(False)
    out[f"DataConfig({size}).load, adopted ({'OpenCV' if images.cv2 is not None else 'Pillow'} for PNG)"] = load(True)
    return out


def side_by_side(paths: list[str], runs: dict, passes: int) -> tuple[dict, dict]:
    """Median over passes of ms/image, and max |candidate - Pillow| over all images."""
    names = list(runs)
    reference = [runs[names[0]](p) for p in paths]  # also warms the page cache
    totals = {n: [] for n in names}
    diffs = dict.fromkeys(names, 0.0)
    for k in range(passes):
        spent = dict.fromkeys(names, 0.0)
        for i, path in enumerate(paths):
            shift = (i + k) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                out = runs[name](path)
                spent[name] += time.perf_counter() - start
                if k == 0:
                    diffs[name] = max(diffs[name], float(np.abs(out - reference[i]).max()))
        for name in names:
            totals[name].append(1000 * spent[name] / len(paths))
    return {n: statistics.median(v) for n, v in totals.items()}, diffs


def pillow_stages(paths: list[str], size: int) -> dict[str, float]:
    spent = dict.fromkeys(("read + PNG decode (Pillow)", "to float (convert 'F')", "bilinear resize (mode F)",
                           "to [0, 1] array"), 0.0)
    keys = list(spent)
    for path in paths:
        t0 = time.perf_counter()
        with Image.open(path) as img:
            img.load()
            t1 = time.perf_counter()
            gray = img.convert("F") if img.mode == "L" else img.convert("L").convert("F")
        t2 = time.perf_counter()
        small = gray.resize((size, size), BILINEAR)
        t3 = time.perf_counter()
        to_unit_array(small, 1 / 255)
        t4 = time.perf_counter()
        for key, a, b in zip(keys, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            spent[key] += b - a
    return {k: 1000 * v / len(paths) for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=NIH_IMAGES)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    args = parser.parse_args()

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    paths = [str(p) for p in sorted(args.images.glob("*.png"))]
    if args.limit:
        paths = paths[:args.limit]
    if not paths:
        sys.exit(f"no PNG files in {args.images}")
    with Image.open(paths[0]) as img:
        first = f"{img.size[0]} x {img.size[1]} {img.mode}"
    print(f"{len(paths)} PNGs from {args.images} (first: {first}), one core, resize to {args.size}, "
          f"median of {args.passes} interleaved passes\n")

    runs = candidates(args.size)
    missing = {n: why for n, why in runs.items() if isinstance(why, str)}
    present = {n: f for n, f in runs.items() if not isinstance(f, str)}
    ms, diffs = side_by_side(paths, present, args.passes)
    forced = next(n for n in ms if n.endswith("forced Pillow"))
    print("| decode + resize | ms/image | vs Pillow | max abs diff vs Pillow |")
    print("|---|---:|---:|---:|")
    for name in runs:
        if name in missing:
            print(f"| {name} | {missing[name]} | | |")
        else:
            diff = "0 (bit-exact)" if diffs[name] == 0 else f"{diffs[name]:.2e}"
            base = ms[forced] if name.startswith("DataConfig") else ms["Pillow (today)"]
            print(f"| {name} | {ms[name]:.2f} | {ms[name] / base:.2f}x | {diff} |")

    print("\n| Pillow stage | ms/image |")
    print("|---|---:|")
    for stage, value in pillow_stages(paths, args.size).items():
        print(f"| {stage} | {value:.2f} |")


if __name__ == "__main__":
    main()
