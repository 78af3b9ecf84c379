"""Does a task's model ever wait on decoding? The extraction loop with a sleeping stand-in for the GPU.

    .venv/bin/python bench/overlap.py [--images DIR] [--limit N] [--threads T] [--batch-size 32]

A GPU runs a batch while the CPU is free; a model that sleeps (time.sleep releases the GIL) for
batch / rate seconds behaves the same way on a machine without one. The real decoding
(DataConfig.load of the 1024-px NIH PNGs in `--threads` threads) feeds it through
common.features.extraction.iter_extract, exactly as a Spark task does. Printed, from one run: the decode rate D
alone, then for model rates M = D/2, D and 2D the images/s without prefetch (decode, then embed:
bounded by 1 / (1/D + 1/M)) and with prefetch (decode batch k+1 while batch k embeds: bounded by
min(D, M)), and the ratio to min(D, M) (target >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.images.data_config import DataConfig  # noqa: E402
from common.features.extraction import iter_extract  # noqa: E402

NIH_IMAGES = REPO.parent / "shared" / "data" / "nih" / "images"


class SleepingModel:
    """A device that embeds `rate` images per second and leaves the CPU (and the GIL) free meanwhile."""

    def __init__(self, rate: float, size: int):
        self.rate, self.data_config = rate, DataConfig(size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        time.sleep(len(images) / self.rate)
        return np.ones((len(images), 4), dtype=np.float32)


def decode_rate(paths: list[str], size: int, threads: int) -> float:
    config = DataConfig(size)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(config.load, paths):
            pass
    return len(paths) / (time.perf_counter() - start)


def pipeline_rate(paths: list[str], size: int, threads: int, model_rate: float, batch: int, prefetch: int) -> float:
    rows = pd.DataFrame({"image_id": [os.path.basename(p) for p in paths], "patient_id": "p", "view": "PA",
                         "age": 50.0, "sex": 1, "labels": [[0]] * len(paths), "split": "train", "path": paths})
    frames = [rows.iloc[i:i + 64] for i in range(0, len(rows), 64)]  # Arrow batches, as Spark hands them over
    model = SleepingModel(model_rate, size)
    start = time.perf_counter()
    n = sum(len(out) for out in iter_extract(frames, model, batch, decode_threads=threads, prefetch=prefetch))
    assert n == len(paths)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=NIH_IMAGES)
    p.add_argument("--limit", type=int, default=420)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="decode threads (the task's cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    paths = sorted(str(f) for f in args.images.glob("*.png"))[:args.limit]
    print(f"{len(paths)} images from {args.images}, {args.threads} decode threads, batch {args.batch_size}", flush=True)

    decode_rate(paths[:32], args.size, args.threads)  # warm-up: page cache, allocator
    d = decode_rate(paths, args.size, args.threads)
    rows = []
    for factor in (0.5, 1.0, 2.0):
        m = d * factor
        serial = pipeline_rate(paths, args.size, args.threads, m, args.batch_size, prefetch=0)
        overlap = pipeline_rate(paths, args.size, args.threads, m, args.batch_size, prefetch=1)
        bound, harmonic = min(d, m), 1 / (1 / d + 1 / m)
        rows.append((f"{factor:g} D", m, serial, harmonic, overlap, bound, overlap / bound))
    d_after = decode_rate(paths, args.size, args.threads)
    print(f"\ndecode rate D: {d:.1f} images/s before, {d_after:.1f} after (the machine's noise between them)\n")
    print("| model rate M | M images/s | no prefetch | 1/(1/D+1/M) | prefetch 1 | min(D, M) | prefetch / min (target >= 0.9) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m, serial, harmonic, overlap, bound, ratio in rows:
        print(f"| {name} | {m:.1f} | {serial:.1f} | {harmonic:.1f} | {overlap:.1f} | {bound:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
