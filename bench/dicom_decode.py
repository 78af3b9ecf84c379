"""Decode cost of DICOM against PNG, on the same real NIH images from ../shared/data, side by side.

    .venv/bin/python bench/dicom_decode.py [--n 100] [--size 224] [--images DIR]

Writes each of the first N PNGs again as DICOM (8-bit MONOCHROME2: uncompressed, RLE Lossless and
JPEG 2000 Lossless) in a temporary folder, then times DataConfig(size).load per file for each format
on one core (best of --repeats passes, so the files are in the page cache), and prints ms/image,
the ratio to PNG, MB/image on disk and the largest difference from the PNG's input.

Then header scanning as `--dataset dicom` does it (common.data.dicom_kind.read_dicom: walk, read the five
tags with stop_before_pixels, build the table) over --header-files hard links to the uncompressed
files, in one process and in a pool of all cores: files/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.images.data_config import DataConfig  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih"


def write_dicoms(pngs: list[Path], out: Path) -> dict[str, list[str]]:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage

    files: dict[str, list[str]] = {"DICOM uncompressed": [], "DICOM RLE Lossless": [], "DICOM JPEG 2000 Lossless": []}
    syntaxes = (None, RLELossless, JPEG2000Lossless)
    for png in pngs:
        with Image.open(png) as img:
            gray = np.asarray(img.convert("L"))
        for kind, (paths, syntax) in enumerate(zip(files.values(), syntaxes)):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.SOPClassUID, ds.Modality = SecondaryCaptureImageStorage, "DX"
            # The tags --dataset dicom reads, as a PACS export has them.
            ds.PatientID, ds.PatientSex, ds.PatientAge, ds.ViewPosition = png.stem[:8], "F", "045Y", "PA"
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.set_pixel_data(gray, "MONOCHROME2", 8)
            if syntax is not None:
                ds.compress(syntax)
            path = out / f"{png.stem}.{kind}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(str(path))
    assert pydicom.dcmread(files["DICOM RLE Lossless"][0]).file_meta.TransferSyntaxUID == RLELossless
    return files


def load_ms(config: DataConfig, paths: list[str], repeats: int) -> tuple[float, list[np.ndarray]]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        arrays = [config.load(p) for p in paths]
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(paths), arrays


def header_scan(sources: list[str], n: int, folder: Path, workers: int, repeats: int) -> tuple[float, int]:
    """Best files/s of read_dicom over `n` hard links to `sources` (100 per folder), and the rows it gave."""
    from common.data.dicom_kind import read_dicom

    if not folder.exists():
        for i in range(n):
            sub = folder / f"series{i // 100:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            os.link(sources[i % len(sources)], sub / f"IM{i:06d}.dcm")
    best, rows = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = len(read_dicom(folder, workers=workers, log=lambda m: None).table)
        best = min(best, time.perf_counter() - start)
    return n / best, rows


def print_table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=NIH / "images")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--header-files", type=int, default=20000,
                   help="files for the header-scanning rate (enough that starting the pool is amortized)")
    args = p.parse_args()

    pngs = sorted(args.images.glob("*.png"))[:args.n]
    config = DataConfig(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"PNG": [str(p) for p in pngs], **write_dicoms(pngs, Path(tmp))}
        print(f"{len(pngs)} NIH images from {args.images}, DataConfig({args.size}).load, one core, "
              f"best of {args.repeats}", flush=True)
        rows, ref = [], None
        for name, paths in files.items():
            ms, arrays = load_ms(config, paths, args.repeats)
            ref = ref if ref is not None else (ms, arrays)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(arrays, ref[1]))
            mb = sum(Path(p).stat().st_size for p in paths) / len(paths) / 1e6
            rows.append((name, f"{ms:.2f}", f"{ms / ref[0]:.2f}", f"{mb:.2f}", f"{diff:.1e}"))
        print_table(("format", "ms/image", "x PNG", "MB/image", "max |diff| vs PNG"), rows)

        cores = os.cpu_count() or 1
        print(f"\nheader scanning (read_dicom: walk + 5 tags, stop_before_pixels) of {args.header_files} files, "
              f"best of {args.repeats}", flush=True)
        rates = {}
        for workers in sorted({1, cores}):
            rates[workers], found = header_scan(files["DICOM uncompressed"], args.header_files,
                                                Path(tmp) / "headers", workers, args.repeats)
            assert found == len(pngs), found  # hard links share a SOPInstanceUID: one row per image
        print_table(("header reading", "files/s", "x one process"),
                    [(f"{w} process(es)", f"{r:.0f}", f"{r / rates[1]:.2f}") for w, r in rates.items()])


if __name__ == "__main__":
    main()
