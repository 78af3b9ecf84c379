"""The work inside one Spark task, as pure functions: rows in, feature rows out.

Each image is decoded on its own (a bad file becomes an error row, never an exception), the good
ones are batched through the frozen backbone, and every input row comes out exactly once.
"""

from __future__ import annotations

import gc
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from common.features.plan import ExtractPlan
from common.images.data_config import input_loader, load_input
from common.images.decode import MAX_PIXELS
from common.models.inference import FeatureExtractor

# Columns the task receives (from the image table), and what it returns: the store's row columns + split + path + error.
INPUT_COLUMNS = ("image_id", "patient_id", "view", "age", "sex", "labels", "split", "path")
OUTPUT_COLUMNS = ("image_id", "patient_id", "view", "age", "sex", "labels", "features", "split", "path", "error")

def transform_batch(transform, decoded: list, image_ids) -> tuple[np.ndarray, dict]:
    """A batch of input_loader results -> the backbone's (n, S, S) batch and the transform's columns (none
    without a transform)."""
    if transform is None:
        return np.stack(decoded), {}
    images, views = (np.stack(batch) for batch in zip(*decoded))
    return transform(images, image_ids, views)


def embed_decoded(rows: pd.DataFrame, decoded: list, extractor: FeatureExtractor, transform=None) -> pd.DataFrame:
    """Embed one batch of decoded rows ((input_loader's result, error) per row); failed images get `error` and
    null features.

    `transform` (e.g. lungs.masking.LungMasker) changes the decoded inputs before the backbone: called on the
    (n, S, S) batch, its image ids and the (n, L, L) batch of its own views it returns the new batch and a list
    per name in its `columns`, which become extra output columns (null for rows that failed)."""
    ok = [i for i, (image, _) in enumerate(decoded) if image is not None]
    features: list = [None] * len(rows)
    errors = [error for _, error in decoded]
    extra = {name: [None] * len(rows) for name in (transform.columns if transform else ())}
    if ok:
        images, columns = transform_batch(transform, [decoded[i][0] for i in ok], [rows["image_id"].iloc[i] for i in ok])
        for name, values in columns.items():
            for row, value in zip(ok, values):
                extra[name][row] = value
        batch = extractor(images)
        for row, vector in zip(ok, batch):
            if np.isfinite(vector).all():
                features[row] = vector
            else:  # a store never holds NaN/Inf: the image is an error, the job goes on
                errors[row] = f"non-finite features: {int((~np.isfinite(vector)).sum())} NaN/Inf values from the backbone"
    out = rows.reset_index(drop=True).copy()
    out["features"] = features
    out["error"] = errors
    for name, values in extra.items():
        out[name] = values
    return out[[*OUTPUT_COLUMNS, *extra]]


def extract_frame(rows: pd.DataFrame, extractor: FeatureExtractor, pool: ThreadPoolExecutor | None = None,
                  max_pixels: int = MAX_PIXELS, transform=None) -> pd.DataFrame:
    """Decode and embed one batch of rows, one after the other (see `embed_decoded`)."""
    load = input_loader(extractor.data_config, transform, max_pixels)
    paths = rows["path"].tolist()
    decoded = list(pool.map(load_input, [load] * len(paths), paths) if pool else (load_input(load, p) for p in paths))
    return embed_decoded(rows, decoded, extractor, transform)


def iter_extract(frames: Iterable[pd.DataFrame], extractor: FeatureExtractor, batch_size: int, max_pixels: int = MAX_PIXELS,
                 transform=None, decode_threads: int = 1, on_batch: Callable[[int, int], None] | None = None,
                 prefetch: int = 1) -> Iterator[pd.DataFrame]:
    """Re-batch Arrow batches of any size into model batches of `batch_size` rows, decoding ahead.

    While the model embeds batch k, `decode_threads` threads already decode batches k+1 .. k+prefetch, so a
    GPU never waits on decoding: the rate approaches min(decode rate, model rate) instead of
    1 / (1/decode + 1/model) (bench/overlap.py). prefetch=0 decodes each batch only when its turn comes."""
    load = input_loader(extractor.data_config, transform, max_pixels)
    pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
    queue: deque = deque()

    def finish(rows, futures):
        out = embed_decoded(rows, [f.result() for f in futures], extractor, transform)
        if on_batch:
            n_errors = int(out["error"].notna().sum())
            on_batch(len(out) - n_errors, n_errors)
        return out

    try:
        for frame in frames:
            for start in range(0, len(frame), batch_size):
                rows = frame.iloc[start:start + batch_size]
                queue.append((rows, [pool.submit(load_input, load, p) for p in rows["path"]]))
                while len(queue) > prefetch:
                    yield finish(*queue.popleft())
        while queue:
            yield finish(*queue.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Embedder:
    """A task's models for a plan: frames of input rows in, their feature rows out (`iter_extract`)."""

    extractor: FeatureExtractor
    masker: Any  # the lung masker of a --view masked plan (iter_extract's transform), else None
    plan: ExtractPlan
    threads: int  # decoding threads: the task's cores

    @property
    def ran(self) -> str:
        """Where and how it embeds, as the commit markers record it: "cpu/bf16", "cuda/fp16"."""
        return f"{self.extractor.device.type}/{self.extractor.precision}"

    def __call__(self, frames: Iterable[pd.DataFrame],
                 on_batch: Callable[[int, int], None] | None = None) -> pd.DataFrame | None:
        plan = self.plan
        outputs = list(iter_extract(frames, self.extractor, plan.batch_size, plan.max_pixels, self.masker,
                                    decode_threads=self.threads, on_batch=on_batch, prefetch=plan.prefetch_batches))
        return pd.concat(outputs, ignore_index=True) if outputs else None


_MODELS: dict[tuple, tuple] = {}  # this Python worker's models, for one key at a time


def worker_models(key: tuple, build: Callable[[], tuple]) -> tuple:
    """The models of `key` in this Python worker, built by `build()` on a miss. Top level on purpose: Spark
    pickles a task's closure by value, globals it names included, so a closure reading `_MODELS` itself got a
    fresh empty copy in every task and rebuilt the models each time; a module function is pickled by reference
    and reads this module's own dict.

    The objects alive after the build (torch, the models) are then frozen out of the cyclic garbage
    collector: pyspark's daemon runs gc.collect() after every task of a reused worker, and walking them
    took ~0.1 s of CPU per task (more than embedding one small image)."""
    models = _MODELS.get(key)
    if models is None:
        gc.unfreeze()  # the old models become collectable again
        _MODELS.clear()  # a worker serves one run's settings; free the old models first
        models = _MODELS[key] = build()
        gc.collect()
        gc.freeze()
    return models


def make_embed_fn(plan: ExtractPlan, weights_file: str | None = None, lung_file: str | None = None,
                  make_masker: Callable[[str, str, str | None], Any] | None = None) -> Callable[..., Embedder]:
    """A plan's embedding in the shape of pyspark's predict_batch_udf: made once on the driver, with the names
    the weights and the lung model were shipped under; called in a task with its GPU (None: none), its cores
    and how to find a shipped file there (SparkFiles.get), it returns the task's Embedder. Spark reuses a
    Python worker for many tasks, so the models are built by its first task and found again by a key the
    driver made: what builds them, so runs that differ only in batching share them. `make_masker(path,
    device, masks_dir)` builds the lung masker of a masked plan (lungs.masking.LungMasker)."""
    key = (plan.backbone, weights_file, plan.weights.seed, plan.precision, plan.data_config, lung_file,
           plan.masks_dir)

    def embed_fn(gpu: str | None, threads: int, locate: Callable[[str], str] = str) -> Embedder:
        device = f"cuda:{gpu}" if gpu is not None and plan.device == "auto" else "cpu"

        def build() -> tuple:
            extractor = FeatureExtractor(plan.backbone, locate(weights_file) if weights_file else None,
                                         plan.weights.seed, device=device, precision=plan.precision,
                                         threads=threads, data_config=plan.data_config)
            return extractor, make_masker(locate(lung_file), device, plan.masks_dir) if lung_file else None

        return Embedder(*worker_models((key, device, threads), build), plan, threads)

    return embed_fn
