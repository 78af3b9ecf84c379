"""Extraction throughput on the real 1024-px NIH PNGs in ../shared/data, measured side by side.

    .venv/bin/python bench/extract_throughput.py [--backbone resnet50] [--images DIR] [--device cpu|cuda]

Prints, from one run:
  (a) decode + resize ms per image on one core
  (b) backbone images/s alone at the job's settings (precision, channels_last, batch size)
  (c) the machine's limit L = cores / (decode + cores / backbone rate)
  (d) a plain single-process PyTorch loop doing the whole work
  (e) the Spark job in local[*], images/s with and without JVM / worker start-up
and the ratios e/L and e/d. Random weights: throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.backbones import get_spec  # noqa: E402
from common.data_config import DataConfig  # noqa: E402
from common.inference import FeatureExtractor  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih"


def decode_ms(paths: list[str], size: int) -> float:
    start = time.perf_counter()
    for p in paths:
        DataConfig(size).load(p)
    return 1000 * (time.perf_counter() - start) / len(paths)


def backbone_rate(extractor: FeatureExtractor, size: int, batch: int, repeats: int) -> float:
    x = np.random.default_rng(0).random((batch, size, size), dtype=np.float32)
    for _ in range(2):  # warm-up: kernel selection, allocator
        extractor(x)
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(x)
    return batch * repeats / (time.perf_counter() - start)


def plain_loop(extractor: FeatureExtractor, paths: list[str], size: int, batch: int) -> float:
    """What a user would write without Spark: decode a batch, embed it, repeat."""
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        extractor(np.stack([extractor.data_config.load(p) for p in paths[i:i + batch]]))
    return len(paths) / (time.perf_counter() - start)


def spark_job(args, cores: int) -> tuple[float, float]:
    """Images/s of the job: cold (JVM, workers and models started inside the timing) and warm."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from jobs.extract import main

    t0 = time.perf_counter()
    spark = (SparkSession.builder.master(f"local[{cores}]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").config("spark.log.level", "WARN").getOrCreate())
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--dataset", "nih", "--metadata", str(args.metadata), "--images", str(args.images),
                 "--backbone", args.backbone, "--weights", "random:0", "--batch-size", str(args.batch_size),
                 "--progress-interval", "30", "--split", "ratios"]
        cold = main([*flags, "--out", f"{tmp}/cold"], spark=spark)
        cold_rate = cold["images_processed"] / (time.perf_counter() - t0)
        # Second run in the same session: Python workers (and their cached model) are reused.
        warm = main([*flags, "--out", f"{tmp}/warm"], spark=spark)
    spark.stop()
    return cold_rate, warm["images_processed"] / warm["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--images", type=Path, default=NIH / "images")
    p.add_argument("--metadata", type=Path, default=NIH / "Data_Entry_2017_v2020.csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--skip-spark", action="store_true")
    args = p.parse_args()

    cores = len(os.sched_getaffinity(0))
    size = get_spec(args.backbone).input_size
    paths = sorted(str(p) for p in args.images.glob("*.png"))
    print(f"{args.backbone}, {len(paths)} images from {args.images}, {cores} cores, device {args.device}, "
          f"torch {torch.__version__}", flush=True)

    torch.set_num_threads(1)
    a = decode_ms(paths, size)
    extractor = FeatureExtractor(args.backbone, None, 0, device=args.device, threads=cores)
    b = backbone_rate(extractor, size, args.batch_size, args.repeats)
    limit = cores / (a / 1000 + cores / b)
    d = plain_loop(extractor, paths, size, args.batch_size)
    rows = [
        ("(a) decode + resize, one core", f"{a:.1f} ms/image"),
        (f"(b) backbone alone ({extractor.dtype}, channels_last, batch {args.batch_size})", f"{b:.1f} images/s"),
        ("(c) machine limit L = cores / (a + cores / b)", f"{limit:.1f} images/s"),
        ("(d) plain single-process PyTorch loop", f"{d:.1f} images/s"),
    ]
    if not args.skip_spark:
        del extractor
        cold, warm = spark_job(args, cores)
        rows += [
            (f"(e) Spark job local[{cores}], with JVM/worker start-up", f"{cold:.1f} images/s"),
            (f"(e) Spark job local[{cores}], without start-up", f"{warm:.1f} images/s"),
            ("e / L (target >= 0.9)", f"{warm / limit:.2f}"),
            ("e / d (target >= 1.0)", f"{warm / d:.2f}"),
        ]
    width = max(len(r[0]) for r in rows)
    print("\n| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
