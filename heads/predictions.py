"""A trained head's per-image probabilities: for the images of feature stores, or for image files
run through the backbone(s) its stores were extracted with. heads/predict.py is the command line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import rundir
from common.store import StoreError
from heads.checkpoint import Head
from heads.choices import PRECISIONS
from heads.data import make_inputs, open_stores, store_info
from heads.fit import input_tensor, predict_logits, resolve_precision

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _check_stores(head: Head, paths: list[str]) -> None:
    """The features must come from what the head was trained on: same backbones, weights, data config."""
    if len(paths) != len(head.stores):
        raise StoreError(f"--store: the head was trained on {len(head.stores)} fused store(s), {len(paths)} given")
    for path, trained in zip(paths, head.stores):
        got = store_info(path).describe()
        # A checkpoint's label holds its path, which moves between machines; its sha256 does not.
        same_file = trained.get("weights_sha256") and trained.get("weights_sha256") == got.get("weights_sha256")
        for key in ("backbone", "feature_dim", "data_config") + (() if same_file else ("weights",)):
            if trained.get(key) is not None and got.get(key) != trained.get(key):
                raise StoreError(
                    f"{path}: {key} {got.get(key)!r} differs from the head's store {trained['path']} "
                    f"({trained.get(key)!r}); the head cannot read these features"
                )


def probabilities(head: Head, features: np.ndarray, age: np.ndarray, sex: np.ndarray,
                  precision: str) -> np.ndarray:
    x = make_inputs(features, age, sex, head.inputs)
    return torch.sigmoid(predict_logits(head.model, input_tensor(x, precision), precision)).numpy()


def predict_stores(head: Head, paths: list[str] | None, splits: list[str] | None,
                   precision: str) -> pd.DataFrame:
    """Probabilities for every image of the chosen splits (default: all) of the store(s)."""
    paths = paths or [s["path"] for s in head.stores]
    _check_stores(head, paths)
    stores = open_stores(paths, splits)
    frames = []
    for name, split in stores.splits.items():
        probs = probabilities(head, split.features, split.age, split.sex, precision)
        frames.append(rundir.predictions_frame(split.image_id, probs, head.label_names,
                                               front={"split": np.full(len(split), name, dtype=object)}))
    return pd.concat(frames, ignore_index=True)


def _weights_argument(label: str) -> str:
    """A manifest's weights label back into a --weights value for common.backbones.resolve_weights."""
    kind, _, rest = label.partition(":")
    return rest if kind == "checkpoint" else label


def image_files(source: str) -> tuple[list[Path], Path]:
    """The image files of a folder (recursively, by suffix) or the one file named; and the root ids are relative to."""
    path = Path(source)
    if path.is_file():
        return [path], path.parent
    if not path.is_dir():
        raise StoreError(f"--images {source}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StoreError(f"--images {source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, path


def predict_images(head: Head, source: str, device: str = "cpu", precision: str = "auto",
                   batch_size: int = 32, threads: int | None = None, log=print) -> pd.DataFrame:
    """Extract features for one image file, or every image under a folder, with the head's backbone(s), then predict."""
    from common.data_config import DataConfig, DataConfigError
    from common.extraction import decode
    from common.inference import FeatureExtractor
    from common.weights import resolve_weights

    if head.inputs.age_sex:
        raise StoreError("--images: this head also takes age and sex, which image files do not carry; use --store")
    files, root = image_files(source)
    extractors = []
    for st in head.stores:
        source = resolve_weights(st["backbone"], _weights_argument(st["weights"]))
        if st.get("weights_sha256") and source.sha256 != st["weights_sha256"]:
            raise StoreError(f"{source.path}: sha256 differs from the weights store {st['path']} was extracted with")
        if not st.get("data_config"):
            raise StoreError(f"{st['path']}: its manifest records no data_config (an older store); re-extract it "
                             "to predict from images")
        try:
            data_config = DataConfig.from_dict(st["data_config"], st["path"])
        except DataConfigError as exc:
            raise StoreError(str(exc)) from None
        extractors.append(FeatureExtractor(st["backbone"], source.path, source.seed, device=device,
                                           precision=precision, threads=threads, data_config=data_config))
    if len(extractors) > 1:
        log(f"note: every image goes through all {len(extractors)} backbones; a store built from other images "
            "(e.g. lung-masked) is not reproduced from a plain folder")

    features = np.full((len(files), sum(head.inputs.feature_dims)), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(files)
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        decoded = {}
        for config in {ex.data_config for ex in extractors}:
            decoded[config] = [decode(config.load, str(p)) for p in batch]
            for i, (_, err) in enumerate(decoded[config]):
                errors[start + i] = errors[start + i] or err
        ok = [i for i in range(len(batch)) if errors[start + i] is None]
        col = 0
        for ex in extractors:
            if ok:
                images = np.stack([decoded[ex.data_config][i][0] for i in ok])
                features[[start + i for i in ok], col:col + ex.feature_dim] = ex(images)
            col += ex.feature_dim
        log(f"{min(start + batch_size, len(files))}/{len(files)} images")
    good = np.array([e is None for e in errors])
    probs = np.full((len(files), len(head.label_names)), np.nan, dtype=np.float32)
    if good.any():
        n = int(good.sum())
        nan = np.full(n, np.nan, dtype=np.float32)
        head_precision = resolve_precision(precision) if precision in PRECISIONS else "fp32"  # fp16 is CUDA-only
        probs[good] = probabilities(head, features[good], nan, nan, head_precision)
    front = {"path": np.array([str(p.resolve()) for p in files], dtype=object),
             "error": np.array(errors, dtype=object)}
    ids = [str(p.relative_to(root)) for p in files]
    return rundir.predictions_frame(ids, probs, head.label_names, front=front)
