"""A trained head's per-image probabilities: for the images of feature stores, or for image files
run through the backbone(s) its stores were extracted with. heads/predict.py is the command line.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.evaluation.calibration import apply_temperature, read_calibration, temperatures
from common.runs import rundir
from common.images.decode import MAX_PIXELS
from common.data.locate import IMAGE_SUFFIXES, is_image_file, walk_files
from common.features.store import StoreError
from common.models.inference import ImagePredictions
from heads.checkpoint import Head, load_head
from heads.choices import PRECISIONS
from heads.data import make_inputs, open_stores, store_info
from heads.fit import input_tensor, predict_logits, resolve_precision


def check_stores(head: Head, paths: list[str]) -> None:
    """The features must come from what the head was trained on: same backbones, weights, data config."""
    if len(paths) != len(head.stores):
        raise StoreError(f"--store: the head was trained on {len(head.stores)} fused store(s), {len(paths)} given")
    for path, trained in zip(paths, head.stores):
        got = store_info(path).describe()
        # A checkpoint's label holds its path, which moves between machines; its sha256 does not.
        same_file = trained.get("weights_sha256") and trained.get("weights_sha256") == got.get("weights_sha256")
        for key in ("backbone", "feature_dim", "data_config", "view") + (() if same_file else ("weights",)):
            if trained.get(key) is not None and got.get(key, "original") != trained.get(key):
                raise StoreError(
                    f"{path}: {key} {got.get(key)!r} differs from the head's store {trained['path']} "
                    f"({trained.get(key)!r}); the head cannot read these features"
                )
        lungs, got_lungs = trained.get("lungs") or {}, got.get("lungs") or {}
        if lungs.get("sha256") and got_lungs.get("sha256") != lungs["sha256"]:
            raise StoreError(f"{path}: masked with another lung model (sha256 {str(got_lungs.get('sha256'))[:12]}) than "
                             f"the head's store {trained['path']} ({lungs['sha256'][:12]}); the head cannot read these features")


def probabilities(head: Head, features: np.ndarray, age: np.ndarray, sex: np.ndarray,
                  precision: str) -> np.ndarray:
    x = make_inputs(features, age, sex, head.inputs)
    return torch.sigmoid(predict_logits(head.model, input_tensor(x, precision), precision)).numpy()


def run_temperature(run, label_names) -> np.ndarray | None:
    """(labels,) temperatures of the run directory `run` (or the folder of its head.pt) when it has a
    calibration.json, fitted on its val split; None for a run that was not calibrated."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    record = read_calibration(folder)
    return temperatures(record, label_names) if record else None


def calibrated(probs: np.ndarray, temperature: np.ndarray | None) -> np.ndarray:
    """Probabilities through the run's temperature scaling; unchanged without one (NaN rows stay NaN)."""
    return probs if temperature is None else apply_temperature(probs, temperature).astype(probs.dtype)


def predict_stores(head: Head, paths: list[str] | None, splits: list[str] | None,
                   precision: str, temperature: np.ndarray | None = None) -> pd.DataFrame:
    """Probabilities for every image of the chosen splits (default: all) of the store(s), through the
    run's temperature scaling when `temperature` is given."""
    paths = paths or [s["path"] for s in head.stores]
    check_stores(head, paths)
    stores = open_stores(paths, splits)
    frames = []
    for name, split in stores.splits.items():
        probs = calibrated(probabilities(head, split.features, split.age, split.sex, precision), temperature)
        frames.append(rundir.predictions_frame(split.image_id, probs, head.label_names,
                                               front={"split": np.full(len(split), name, dtype=object)}))
    return pd.concat(frames, ignore_index=True)


def _lung_masker(st: dict, device: str):
    """The lung model a masked store was extracted with, checked by sha256, as an input transform."""
    from common.models.weights import file_sha256
    from lungs.masking import LungMasker
    from lungs.model import lung_model_file

    lungs = st.get("lungs")
    if not lungs or not lungs.get("sha256"):
        raise StoreError(f"{st['path']}: a {st['view']} store whose lung model the head does not record (trained "
                         "before masked prediction existed); retrain the head to predict from images")
    label = lungs.get("label") or ""
    path = lung_model_file(label.removeprefix("checkpoint:"))  # "default": the shipped model
    if not path.is_file():
        raise StoreError(f"{st['path']}: its lung model {path} is not here; put that file there to predict from images")
    if file_sha256(str(path)) != lungs["sha256"]:
        raise StoreError(f"{path}: sha256 differs from the lung model store {st['path']} was masked with")
    return LungMasker(str(path), device)


def _weights_argument(label: str) -> str:
    """A manifest's weights label back into a --weights value for common.models.weights.resolve_weights."""
    kind, _, rest = label.partition(":")
    return rest if kind == "checkpoint" else label


@dataclass
class ImageFiles:
    ids: list[str]  # relative to the folder (or the file's name), sorted: one output row each
    paths: list[str]  # absolute: the folder resolved, the entries below it as listed
    skipped: list[str | None]  # why a row is not decoded, None for an image to decode
    others: list[str]  # ids of files without an image suffix: logged, not rows


def _skip_reason(path: str) -> str:
    """Why a name with an image suffix is not an image file (common.data.locate.is_image_file): opening a
    FIFO or device would block or read forever, and a dangling link has nothing to read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "skipped: dangling symlink" if os.path.islink(path) else "skipped: gone since listed"
    except OSError as exc:  # e.g. a link to itself: too many levels of symbolic links
        return f"skipped: {(exc.strerror or str(exc)).lower()}"
    return "skipped: not a regular file" if not stat.S_ISREG(mode) else "skipped: not readable as a file"


def image_files(source: str) -> ImageFiles:
    """Every entry below a folder (or the one file named), by common.data.locate's rule: image files to
    decode, names with an image suffix that are not image files as skipped rows, the rest aside."""
    path = Path(source)
    if not path.is_dir():
        if not os.path.lexists(path):
            raise StoreError(f"--images {source}: no such file or directory")
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise StoreError(f"--images {source}: not an image suffix ({', '.join(IMAGE_SUFFIXES)})")
        if not is_image_file(path):
            raise StoreError(f"--images {source}: {_skip_reason(str(path)).removeprefix('skipped: ')}")
        return ImageFiles([path.name], [str(path.resolve())], [None], [])
    root = path.resolve()
    rows, others = [], []
    for entry in walk_files(root):
        rel = os.path.relpath(entry.path, root)
        if is_image_file(entry):
            rows.append((rel, entry.path, None))
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            rows.append((rel, entry.path, _skip_reason(entry.path)))
        else:
            others.append(rel)
    rows.sort(key=lambda row: Path(row[0]).parts)
    if not rows:
        aside = f"; {len(others)} other files, e.g. {', '.join(sorted(others)[:3])}" if others else ""
        raise StoreError(f"--images {source}: no image files ({', '.join(IMAGE_SUFFIXES)}){aside}")
    ids, paths, skipped = (list(c) for c in zip(*rows))
    return ImageFiles(ids, paths, skipped, sorted(others))


class HeadOnImages:
    """A head run as one model from images: the backbone(s) its stores were extracted with (and a masked
    store's lung model), built once, then the head. heads.predict --images and the diagnosis service
    both predict through it, so one image gets one answer wherever it is asked."""

    def __init__(self, head: Head, device: str = "cpu", precision: str = "auto", threads: int | None = None,
                 log=print, temperature: np.ndarray | None = None):
        from common.images.data_config import DataConfig, DataConfigError
        from common.models.inference import FeatureExtractor
        from common.models.weights import resolve_weights

        if head.inputs.age_sex:
            raise StoreError("--images: this head also takes age and sex, which image files do not carry; use --store")
        self.head, self.log = head, log
        self.temperature = temperature  # the run's calibration (fitted on val), applied to every answer
        self.extractors, self.maskers = [], []
        for st in head.stores:
            view = st.get("view", "original")
            if view not in ("original", "masked"):
                raise StoreError(f"{st['path']}: a {view} store, a view this version cannot reproduce from image files")
            # A masked store's features came from lung-masked inputs: the same lung model masks these images.
            self.maskers.append(_lung_masker(st, device) if view == "masked" else None)
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
            self.extractors.append(FeatureExtractor(st["backbone"], source.path, source.seed, device=device,
                                                    precision=precision, threads=threads, data_config=data_config))
        # How each store's model decodes an image (common.images.data_config.input_loader, as its extraction did: the input,
        # or a masked store's input and its lung model's view), once for all the stores that share it.
        self.loads = {}
        for ex, masker in zip(self.extractors, self.maskers):
            self.loads.setdefault(self._key(ex.data_config, masker), (ex.data_config, masker))
        # fp16 is CUDA-only: the small head runs in fp32 or bf16 on the CPU.
        self.head_precision = resolve_precision(precision) if precision in PRECISIONS else "fp32"
        if len(self.extractors) > 1:
            log(f"note: every image goes through all {len(self.extractors)} stores' models (fused input)")

    @classmethod
    def from_run(cls, run, device: str = "cpu", precision: str = "auto", threads: int | None = None,
                 log=print) -> HeadOnImages:
        """The head of run directory `run`, ready for images, with the run's calibration when it has one."""
        head = load_head(run)
        return cls(head, device, precision, threads, log, run_temperature(run, head.label_names))

    @property
    def label_names(self) -> list[str]:
        return list(self.head.label_names)

    @staticmethod
    def _key(data_config, masker) -> tuple:
        return data_config, masker.view(data_config) if masker is not None else None

    def decode(self, source, max_pixels: int = MAX_PIXELS) -> tuple[dict | None, str | None]:
        """({input key: model input(s)}, None), or (None, a one-line error). `source` is a path or a
        seekable binary stream (rewound for each data config)."""
        from common.images.data_config import input_loader, load_input

        inputs = {}
        for key, (config, masker) in self.loads.items():
            if hasattr(source, "seek"):
                source.seek(0)
            inputs[key], error = load_input(input_loader(config, masker, max_pixels), source)
            if error is not None:
                return None, error
        return inputs, None

    def predict(self, inputs: list[dict], ids: list[str]) -> ImagePredictions:
        """Probabilities (n, labels) of decoded images (NaN rows for errors), each row's error or None,
        the lung columns of masked stores (lung_fraction, lung_qa) and the lung-masked inputs."""
        from common.features.extraction import transform_batch

        n = len(inputs)
        features = np.full((n, sum(self.head.inputs.feature_dims)), np.nan, dtype=np.float32)
        lung_columns: dict[str, list] = {}
        masked = None
        col = 0
        for ex, masker in zip(self.extractors, self.maskers):
            if n:
                images, columns = transform_batch(masker, [x[self._key(ex.data_config, masker)] for x in inputs], ids)
                if masker is not None:
                    masked = images
                    for name, values in columns.items():
                        lung_columns[name] = list(values)
                features[:, col:col + ex.feature_dim] = ex(images)
            col += ex.feature_dim
        # Never NaN probabilities: a non-finite feature row is that image's error, as in extraction.
        bad = ~np.isfinite(features).all(axis=1)
        errors = [f"non-finite features: {int((~np.isfinite(features[i])).sum())} NaN/Inf values from the backbone"
                  if bad[i] else None for i in range(n)]
        probs = np.full((n, len(self.head.label_names)), np.nan, dtype=np.float32)
        if (~bad).any():
            nan = np.full(int((~bad).sum()), np.nan, dtype=np.float32)
            probs[~bad] = calibrated(probabilities(self.head, features[~bad], nan, nan, self.head_precision),
                                     self.temperature)
        return ImagePredictions(probs, errors, lung_columns, masked)


def predict_files(model, ids: list[str], paths: list[str], skipped: list[str | None] | None = None,
                  batch_size: int = 32, max_pixels: int = MAX_PIXELS,
                  log=print) -> tuple[np.ndarray, list[str | None], dict[str, list]]:
    """Probabilities (n, labels; NaN rows for errors), each row's error or None, and a masked store's lung
    columns, of image files through `model` (HeadOnImages or finetune.predictor.FinetuneOnImages: decode,
    then predict a batch). A file that cannot be read is its row's error, never the end of the run; rows
    already `skipped` (their reason) are not opened. Progress in images/s and the time left, every 10 s."""
    n = len(ids)
    probs = np.full((n, len(model.label_names)), np.nan, dtype=np.float32)
    errors = list(skipped) if skipped is not None else [None] * n
    todo = [i for i in range(n) if errors[i] is None]
    lung_columns: dict[str, list] = {}  # lung_fraction and lung_qa of a masked store's input, as the store has them
    progress = Progress(len(todo), log)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        inputs = {}
        for i in batch:
            inputs[i], errors[i] = model.decode(paths[i], max_pixels)
        ok = [i for i in batch if errors[i] is None]
        if ok:
            out = model.predict([inputs[i] for i in ok], [ids[i] for i in ok])
            probs[ok] = out.probs
            for k, i in enumerate(ok):
                errors[i] = out.errors[k]
            for name, values in out.columns.items():
                lung_columns.setdefault(name, [None] * n)
                for i, value in zip(ok, values):
                    lung_columns[name][i] = value
        progress.step(start + len(batch))
    good = np.array([e is None for e in errors], dtype=bool)
    if not good.all():
        first = int(np.flatnonzero(~good)[0])
        log(f"{int((~good).sum())} of {n} rows have an error and no probabilities, e.g. {ids[first]}: {errors[first]}")
    return probs, errors, lung_columns


class Progress:
    """'k/n images, r images/s, about s s left' on the first batch, every `every` seconds and at the end."""

    def __init__(self, total: int, log=print, every: float = 10.0):
        self.total, self.log, self.every = total, log, every
        self.start = self.last = time.monotonic()
        self.shown = False

    def step(self, done: int) -> None:
        now = time.monotonic()
        if self.shown and now - self.last < self.every and done < self.total:
            return
        rate = done / max(now - self.start, 1e-9)
        left = f", about {(self.total - done) / rate:.0f} s left" if done < self.total and rate > 0 else ""
        self.log(f"{done}/{self.total} images, {rate:.1f} images/s{left}")
        self.shown, self.last = True, now


def predict_images(head: Head, source: str, device: str = "cpu", precision: str = "auto",
                   batch_size: int = 32, threads: int | None = None, log=print,
                   max_pixels: int = MAX_PIXELS, temperature: np.ndarray | None = None) -> pd.DataFrame:
    """Extract features for one image file, or every image under a folder, with the head's backbone(s), then
    predict (through `temperature` scaling when given). Every image-named file gets a row (an error row if
    skipped or unreadable); others get a log line."""
    if head.inputs.age_sex:
        raise StoreError("--images: this head also takes age and sex, which image files do not carry; use --store")
    listing = image_files(source)
    if listing.others:
        log(f"--images {source}: {len(listing.others)} files without an image suffix ({', '.join(IMAGE_SUFFIXES)}) "
            f"left out, e.g. {', '.join(listing.others[:3])}")
    model = HeadOnImages(head, device, precision, threads, log, temperature)
    probs, errors, lung_columns = predict_files(model, listing.ids, listing.paths, listing.skipped, batch_size,
                                                max_pixels, log)
    front = {"path": np.array(listing.paths, dtype=object), "error": np.array(errors, dtype=object),
             **{name: np.array(values, dtype=object) for name, values in lung_columns.items()}}
    return rundir.predictions_frame(listing.ids, probs, head.label_names, front=front)
