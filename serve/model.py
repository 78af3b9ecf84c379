"""The model a diagnosis service answers with: a head run or a fine-tune run, loaded once.

Both kinds give the same small interface: `decode(source)` turns an upload (a seekable binary
stream) into the model's input exactly as extraction and `heads.predict --images` do (one data
config per model), and `predict(inputs)` answers a batch. A head run reproduces its stores'
backbone(s) through heads.predictions.HeadOnImages, so a file gets the probabilities
`heads.predict --images` gives it; a fine-tune run is its `best.pt`, with class activation maps, through
finetune.predictor.FinetuneOnImages. A run with a calibration.json answers calibrated probabilities (both
predictors apply it) and its thresholds are mapped the same way; the run's model card
(common.evaluation.model_card) says what answers and carries the warnings the page shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.evaluation.calibration import apply_temperature
from common.evaluation.model_card import build_card
from common.runs import rundir
from common.images.decode import MAX_PIXELS


class ModelError(ValueError):
    """A run directory that cannot be served: one line naming it."""


@dataclass
class Served:
    kind: str  # "head" or "finetune"
    run: Path
    predictor: object  # HeadOnImages or FinetuneOnImages
    label_names: list[str]
    thresholds: np.ndarray  # per class, chosen on the run's val split (0.5 where val had no positive)
    identity: dict = field(default_factory=dict)  # what answers: for the page and GET /api/model
    data_config: object = None  # the input geometry CAM maps are drawn in (fine-tune runs)
    card: dict = field(default_factory=dict)  # the run's model card (common.evaluation.model_card)

    @property
    def has_cam(self) -> bool:
        return getattr(self.predictor, "cam", None) is not None

    @property
    def calibrated(self) -> bool:
        return getattr(self.predictor, "temperature", None) is not None

    def decode(self, source, max_pixels: int = MAX_PIXELS):
        return self.predictor.decode(source, max_pixels)

    def predict(self, inputs: list, ids: list[str]):
        return self.predictor.predict(inputs, ids)


CALIBRATED = "calibrated (temperature scaling, fitted on val)"
RAW = "raw (the run has no calibration.json)"


def headline_summary(card: dict) -> dict | None:
    """The headline metric as the page must show it: never a mean AUROC without its split, n and interval."""
    t = card.get("test")
    if t is None:
        return None
    b = t.get("bootstrap")
    interval = (f"95% CI, {b['unit']}-level bootstrap of {b['draws']} draws"
                if b and t["mean_auroc_ci_low"] is not None else None)
    return {"split": t["split"], "n": t["n"], "mean_auroc": t["mean_auroc"], "ci_low": t["mean_auroc_ci_low"],
            "ci_high": t["mean_auroc_ci_high"], "interval": interval}


def _thresholds(predictor, raw: np.ndarray, names: list[str], card: dict) -> tuple[np.ndarray, dict]:
    """The thresholds on the scale the predictor answers in (a monotone calibration maps them as it maps
    probabilities) and where each came from."""
    thresholds = np.asarray(raw, dtype=float)
    if getattr(predictor, "temperature", None) is not None:
        thresholds = apply_temperature(thresholds, predictor.temperature)
    fallback = set(card["thresholds"]["fallback_0.5"])
    sources = {n: "fallback 0.5 (val had no positive)" if n in fallback else "chosen on val (max F1)" for n in names}
    note = "per class, chosen on the run's val split (max F1)"
    if fallback:
        note += f"; 0.5 fallback, not chosen, for {', '.join(n for n in names if n in fallback)} (val had no positive)"
    if getattr(predictor, "temperature", None) is not None:
        note += "; mapped through the calibration as the probabilities are"
    return thresholds, {"thresholds_note": note, "threshold_sources": sources}


def _head_identity(predictor) -> dict:
    stores = predictor.head.stores
    return {
        "kind": "head",
        "backbone": " + ".join(s.get("backbone", "?") for s in stores),
        "weights": " + ".join(str(s.get("weights")) for s in stores),
        "view": " + ".join(s.get("view", "original") for s in stores),
        "training_data": " + ".join(f"{s.get('dataset', '?')} store {Path(s.get('path', '?')).name}" for s in stores),
        "head": predictor.head.spec.name if hasattr(predictor.head.spec, "name") else str(predictor.head.spec),
        "heatmap": "a head on frozen pooled features has no spatial map to show",
    }


def _finetune_identity(predictor, path: Path, config: dict) -> dict:
    return {
        "kind": "finetune",
        "backbone": predictor.backbone if predictor.architecture == "classifier" else
                    f"{predictor.backbone} ({predictor.architecture})",
        "weights": f"fine-tuned: {path}",
        "view": "original",
        "training_data": str(config.get("settings", {}).get("dataset", config.get("dataset", "?"))),
        "heatmap": "class activation map (CAM) of the chosen finding" if predictor.cam is not None else
                   f"CAM is not defined for {predictor.backbone}",
    }


def load_served(run: str | Path, device: str = "cpu", precision: str = "auto", threads: int | None = None,
                log=print) -> Served:
    """The model of a head or fine-tune run directory (its marker says which), loaded once, with its
    calibration when the run has one and its model card."""
    run = Path(run)
    marker = rundir.read_marker(run) if run.is_dir() else None
    if marker is None:
        raise ModelError(f"--run {run}: not a run directory (no {rundir.MARKER}); give a heads.train or "
                         "finetune run")
    kind = marker.get("kind")
    config = rundir.read_json(run / rundir.CONFIG) if (run / rundir.CONFIG).is_file() else {}
    metrics = rundir.read_json(run / rundir.METRICS) if (run / rundir.METRICS).is_file() else {}
    # Serving imports each kind's predictor on images, and nothing else of training.
    if kind == "head":
        from heads.predictions import HeadOnImages

        predictor = HeadOnImages.from_run(run, device, precision, threads, log)
        identity, raw, data_config = _head_identity(predictor), predictor.head.thresholds, None
    elif kind == "finetune":
        from finetune.predictor import FinetuneOnImages

        path = run / rundir.BEST
        if not path.is_file():
            raise ModelError(f"--run {run}: no {rundir.BEST} yet (the fine-tune has not finished an epoch)")
        predictor = FinetuneOnImages.from_run(run, device)
        thresholds = metrics.get("thresholds") or {}
        identity, data_config = _finetune_identity(predictor, path, config), predictor.data_config
        raw = [thresholds.get(n, 0.5) for n in predictor.label_names]
    else:
        raise ModelError(f"--run {run}: a {kind} run; serve a head (heads.train) or fine-tune (finetune) run")
    card = build_card(run)
    names = list(predictor.label_names)
    thresholds, labelled = _thresholds(predictor, raw, names, card)
    served = Served(kind, run, predictor, names, thresholds, data_config=data_config, card=card)
    test = headline_summary(card)
    served.identity = {**identity, "run": str(run.resolve()), "labels": len(names),
                       "date": config.get("finished") or marker.get("created"),
                       "test_mean_auroc": test and test["mean_auroc"], "test": test, **labelled,
                       "calibration": CALIBRATED if served.calibrated else RAW, "warnings": card["warnings"]}
    return served
