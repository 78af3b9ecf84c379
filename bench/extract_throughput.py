"""Extraction throughput on the real 1024-px NIH PNGs in ../shared/data, measured side by side.

    .venv/bin/python bench/extract_throughput.py [--backbone resnet50] [--images DIR] [--device cpu|cuda]
                                                 [--limit N] [--skip-spark]

Prints, from one run:
  (a)  decode + resize ms per image on one core
  (b)  backbone images/s alone at the job's settings (precision, channels_last, batch size)
  (c)  the machine's limit L = cores / (decode + cores / backbone rate)
  (d)  a plain single-process PyTorch loop doing the whole work
  (d2) a PyTorch DataLoader loop with `cores` worker processes (the loop a user would write)
  (e)  the Spark job in local[cores], images/s with and without JVM / worker start-up
  (f)  Spark's own predict_batch_udf recipe (PIL + torchvision transforms, fp32) in local[cores], warm
and the ratios e/L, e/d, e/d2 and e/f. Random weights: throughput does not depend on the weights' values.
--limit N uses the first N images (by name) in every measure, for smoke tests; --skip-spark skips (e) and (f).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.models.model_registry import get_spec  # noqa: E402
from common.images.data_config import DataConfig  # noqa: E402
from common.models.inference import FeatureExtractor  # noqa: E402

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


class LoadedImages(torch.utils.data.Dataset):
    """The project's one preprocessing per item, so (d2) differs from the job only in how it runs."""

    def __init__(self, paths: list[str], data_config: DataConfig):
        self.paths, self.data_config = paths, data_config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data_config.load(self.paths[i])


def dataloader_loop(extractor: FeatureExtractor, paths: list[str], batch: int, workers: int) -> float:
    """The loop a user would write with PyTorch alone: `workers` processes decode, the main process embeds
    (the job's FeatureExtractor: same precision and channels_last). Timed end to end, worker start included."""
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(LoadedImages(paths, extractor.data_config), batch_size=batch,
                                         num_workers=workers, pin_memory=extractor.device.type == "cuda")
    for images in loader:
        extractor(images.numpy())
    return len(paths) / (time.perf_counter() - start)


def local_session(cores: int):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    return (SparkSession.builder.master(f"local[{cores}]").config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false").config("spark.log.level", "WARN").getOrCreate())


def spark_job(args, cores: int) -> tuple[float, float]:
    """Images/s of the job: cold (JVM, workers and models started inside the timing) and warm."""
    import pyspark.sql  # noqa: F401  (imported outside the timing, as before)

    from jobs.extract import main

    t0 = time.perf_counter()
    spark = local_session(cores)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--dataset", "nih", "--metadata", str(args.metadata), "--images", str(args.images),
                 "--backbone", args.backbone, "--weights", "random:0", "--batch-size", str(args.batch_size),
                 "--progress-interval", "30", "--split", "ratios"]
        if args.limit:
            flags += ["--limit", str(args.limit)]  # the first N by image_id: the same images as `paths`
        cold = main([*flags, "--out", f"{tmp}/cold"], spark=spark)
        cold_rate = cold["images_processed"] / (time.perf_counter() - t0)
        # Second run in the same session: Python workers (and their cached model) are reused.
        warm = main([*flags, "--out", f"{tmp}/warm"], spark=spark)
    spark.stop()
    return cold_rate, warm["images_processed"] / warm["seconds"]


def predict_batch_udf_rate(args, cores: int, paths: list[str], data_config: DataConfig) -> tuple[float, int]:
    """Spark's own recipe for batch inference: (images/s of its second run in one session, partitions).

    It follows the make_predict_fn pattern of the pyspark.ml.functions.predict_batch_udf docstring (Spark
    3.4+ API reference) and, for images, the ResNet-50 example of NVIDIA/spark-rapids-examples' "Spark DL
    Inference" predict_batch_udf notebooks (examples/ML+DL-Examples/Spark-DL/dl_inference/benchmark/
    spark_resnet.py): raw image bytes in a DataFrame, a scalar-iterator pandas UDF that decodes each with
    PIL `Image.open(...).convert("RGB")` and torchvision transforms (Resize, CenterCrop, ToTensor,
    Normalize with ImageNet mean/std) into a flattened float32 tensor column, then a predict_batch_udf
    whose make_predict_fn builds the torchvision model once per Python worker and runs it in fp32 under
    torch.no_grad, written to Parquet. The bytes come from spark.read.format("binaryFile"), as Databricks'
    "reference solution for image applications" loads images.

    Differences from the recipe, all to compare like with like: random weights and the pooled features of
    the same backbone as the job (common.models.inference.build_extractor: for resnet50, torchvision's resnet50
    with fc = Identity); the job's input geometry (Resize to the data config's square side, CenterCrop to
    its input size: for resnet50 Resize(224), CenterCrop(224), the job's resize on square NIH images);
    batch_size = the job's; only (path, features) written, not the input tensors. Spark's defaults
    otherwise, as a user of the recipe has them: binaryFile's partitions (files packed up to 128 MB,
    counting 4 MB per file: 15 partitions for the 420 NIH images, 3 for 64) and the torch threads Spark's
    OMP_NUM_THREADS gives each Python worker (1 in local[*]). A fresh session, so no worker holds the job's model.
    """
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.functions import col, pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    backbone, side, size = args.backbone, data_config.square_side, data_config.input_size
    mean, std = list(data_config.mean), list(data_config.std)

    @pandas_udf(ArrayType(FloatType()))
    def preprocess(contents: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import io

        from PIL import Image
        from torchvision import transforms

        transform = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(size), transforms.ToTensor(),
                                        transforms.Normalize(mean=mean, std=std)])
        for batch in contents:
            yield pd.Series([transform(Image.open(io.BytesIO(raw)).convert("RGB")).numpy().reshape(-1)
                             for raw in batch])

    def make_predict_fn():
        # Once per Python worker (predict_batch_udf caches the returned function).
        from common.models.inference import build_extractor

        model = build_extractor(backbone, None, 0)  # eval mode, random weights, classifier = Identity

        def predict(inputs: np.ndarray) -> np.ndarray:
            # inputs.shape = [batch_size, 3, size, size] (input_tensor_shapes); fp32, as the docs show
            with torch.no_grad():
                return model(torch.from_numpy(inputs)).numpy()

        return predict

    classify = predict_batch_udf(make_predict_fn, return_type=ArrayType(FloatType()),
                                 batch_size=args.batch_size, input_tensor_shapes=[[3, size, size]])
    spark = local_session(cores)
    # As the recipe sets them: large Arrow buffers for rows of image bytes and tensors.
    spark.conf.set("spark.sql.execution.arrow.useLargeVarTypes", "true")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("first", "warm"):  # the first run builds the model in each Python worker
            start = time.perf_counter()
            df = spark.read.format("binaryFile").load(paths)
            partitions = df.rdd.getNumPartitions()
            preds = (df.withColumn("images", preprocess(col("content"))).drop("content")
                     .withColumn("features", classify(col("images"))))
            preds.select("path", "features").write.mode("overwrite").parquet(f"{tmp}/{run}")
            seconds.append(time.perf_counter() - start)
            rows = spark.read.parquet(f"{tmp}/{run}").count()
            if rows != len(paths):
                raise RuntimeError(f"predict_batch_udf run wrote {rows} rows for {len(paths)} images")
    spark.stop()
    return len(paths) / seconds[-1], partitions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--images", type=Path, default=NIH / "images")
    p.add_argument("--metadata", type=Path, default=NIH / "Data_Entry_2017_v2020.csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--limit", type=int, help="use only the first N images (by name), for smoke tests")
    p.add_argument("--skip-spark", action="store_true", help="skip (e) and (f)")
    args = p.parse_args()
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: must be at least 1")

    cores = len(os.sched_getaffinity(0))
    size = get_spec(args.backbone).input_size
    paths = sorted(str(p) for p in args.images.glob("*.png"))[:args.limit]
    if not paths:
        p.error(f"--images {args.images}: no PNG files")
    print(f"{args.backbone}, {len(paths)} images from {args.images}, {cores} cores, device {args.device}, "
          f"torch {torch.__version__}", flush=True)

    torch.set_num_threads(1)
    a = decode_ms(paths, size)
    extractor = FeatureExtractor(args.backbone, None, 0, device=args.device, threads=cores)
    b = backbone_rate(extractor, size, args.batch_size, args.repeats)
    limit = cores / (a / 1000 + cores / b)
    d = plain_loop(extractor, paths, size, args.batch_size)
    d2 = dataloader_loop(extractor, paths, args.batch_size, cores)
    rows = [
        ("(a) decode + resize, one core", f"{a:.1f} ms/image"),
        (f"(b) backbone alone ({extractor.dtype}, channels_last, batch {args.batch_size})", f"{b:.1f} images/s"),
        ("(c) machine limit L = cores / (a + cores / b)", f"{limit:.1f} images/s"),
        ("(d) plain single-process PyTorch loop", f"{d:.1f} images/s"),
        (f"(d2) PyTorch DataLoader loop, num_workers = {cores}, with worker start-up", f"{d2:.1f} images/s"),
    ]
    if not args.skip_spark:
        data_config = extractor.data_config
        del extractor
        cold, warm = spark_job(args, cores)
        f, parts = predict_batch_udf_rate(args, cores, paths, data_config)
        rows += [
            (f"(e) Spark job local[{cores}], with JVM/worker start-up", f"{cold:.1f} images/s"),
            (f"(e) Spark job local[{cores}], without start-up", f"{warm:.1f} images/s"),
            (f"(f) predict_batch_udf recipe local[{cores}] (PIL + torchvision, fp32, {parts} binaryFile "
             "partitions), without start-up", f"{f:.1f} images/s"),
            ("e / L (target >= 0.95)", f"{warm / limit:.2f}"),
            ("e / d (target >= 1.0)", f"{warm / d:.2f}"),
            ("e / d2 (target >= 1.1)", f"{warm / d2:.2f}"),
            ("e / f (target >= 1.5)", f"{warm / f:.2f}"),
        ]
    width = max(len(r[0]) for r in rows)
    print("\n| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
