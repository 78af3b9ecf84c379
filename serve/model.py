"""The model a diagnosis service answers with: a head run or a fine-tune run, loaded once.

Both kinds give the same small interface: `decode(source)` turns an upload (a seekable binary
stream) into the model's input exactly as extraction and `heads.predict --images` do (one data
config per model), and `predict(inputs)` answers a batch. A head run reproduces its stores'
backbone(s) through heads.predictions.HeadOnImages, so a file gets the probabilities
`heads.predict --images` gives it; a fine-tune run is its `best.pt`, with class activation maps, through
finetune.predictor.FinetuneOnImages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    thresholds: np.ndarray  # per class, chosen on the run's val split
    identity: dict = field(default_factory=dict)  # what answers: for the page and GET /api/model
    data_config: object = None  # the input geometry CAM maps are drawn in (fine-tune runs)

    @property
    def has_cam(self) -> bool:
        return getattr(self.predictor, "cam", None) is not None

    def decode(self, source, max_pixels: int = MAX_PIXELS):
        return self.predictor.decode(source, max_pixels)

    def predict(self, inputs: list, ids: list[str]):
        return self.predictor.predict(inputs, ids)


def _test_auroc(metrics: dict) -> float | None:
    test = metrics.get("splits", {}).get("test", {})
    return test.get("summary", {}).get("mean_auc")


def load_served(run: str | Path, device: str = "cpu", precision: str = "auto", threads: int | None = None,
                log=print) -> Served:
    """The model of a head or fine-tune run directory (its marker says which), loaded once."""
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
        head = predictor.head
        stores = head.stores
        identity = {
            "kind": "head",
            "backbone": " + ".join(s.get("backbone", "?") for s in stores),
            "weights": " + ".join(str(s.get("weights")) for s in stores),
            "view": " + ".join(s.get("view", "original") for s in stores),
            "training_data": " + ".join(f"{s.get('dataset', '?')} store {Path(s.get('path', '?')).name}" for s in stores),
            "head": head.spec.name if hasattr(head.spec, "name") else str(head.spec),
            "heatmap": "a head on frozen pooled features has no spatial map to show",
        }
        served = Served("head", run, predictor, list(head.label_names), np.asarray(head.thresholds, dtype=float))
    elif kind == "finetune":
        from finetune.predictor import FinetuneOnImages

        path = run / rundir.BEST
        if not path.is_file():
            raise ModelError(f"--run {run}: no {rundir.BEST} yet (the fine-tune has not finished an epoch)")
        predictor = FinetuneOnImages(path, device)
        names = predictor.label_names
        thresholds = metrics.get("thresholds") or {}
        identity = {
            "kind": "finetune",
            "backbone": predictor.backbone if predictor.architecture == "classifier" else
                        f"{predictor.backbone} ({predictor.architecture})",
            "weights": f"fine-tuned: {path}",
            "view": "original",
            "training_data": str(config.get("settings", {}).get("dataset", config.get("dataset", "?"))),
            "heatmap": "class activation map (CAM) of the chosen finding" if predictor.cam is not None else
                       f"CAM is not defined for {predictor.backbone}",
        }
        served = Served("finetune", run, predictor, names,
                        np.asarray([thresholds.get(n, 0.5) for n in names], dtype=float),
                        data_config=predictor.data_config)
    else:
        raise ModelError(f"--run {run}: a {kind} run; serve a head (heads.train) or fine-tune (finetune) run")
    served.identity = {**identity, "run": str(run.resolve()), "labels": len(served.label_names),
                       "date": config.get("finished") or marker.get("created"), "test_mean_auroc": _test_auroc(metrics),
                       "thresholds_note": "per class, chosen on the run's val split"}
    return served
