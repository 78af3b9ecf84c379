"""A fine-tune run as a predictor on images (its best.pt), beside heads.predictions.HeadOnImages: what the
diagnosis service serves. The same interface: `decode(source, max_pixels)` makes the model's input exactly as
extraction does (one data config per model), `predict(inputs, ids)` answers a batch."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from common.evaluation.calibration import apply_temperature, read_calibration, temperatures
from common.images.data_config import load_input
from common.images.decode import MAX_PIXELS
from common.models.architectures import load_finetuned
from common.models.cam import heatmap_fn
from common.models.checkpoint import read_checkpoint
from common.models.inference import ImagePredictions
from common.models.model_registry import get_spec
from common.runs import rundir


class FinetuneOnImages:
    """A fine-tune run's best.pt from images: probabilities and class activation maps in one forward pass."""

    def __init__(self, path: Path, device: str = "cpu", temperature: np.ndarray | None = None):
        weights = read_checkpoint(path, finetune=True)
        spec = get_spec(weights.backbone)
        self.model = load_finetuned(weights).to(device).eval()
        self.device = torch.device(device)
        self.data_config = weights.data_config or spec.data_config
        self.label_names = list(weights.label_names)
        self.backbone, self.architecture = weights.backbone, weights.architecture
        self.temperature = temperature  # the run's calibration (fitted on val), applied to every answer
        try:
            self.cam = heatmap_fn(self.model, spec)  # x -> (maps, logits)
        except ValueError:
            self.cam = None  # e.g. VGG-19: probabilities only, and the page says why there is no map

    @classmethod
    def from_run(cls, run, device: str = "cpu") -> FinetuneOnImages:
        """The best.pt of fine-tune run directory `run`, with the run's calibration when it has one."""
        predictor = cls(Path(run) / rundir.BEST, device)
        record = read_calibration(run)
        if record:
            predictor.temperature = temperatures(record, predictor.label_names)
        return predictor

    def decode(self, source, max_pixels: int = MAX_PIXELS):
        """({data config: input}, None) or (None, a one-line error); `source` a path or a binary stream."""
        if hasattr(source, "seek"):
            source.seek(0)
        image, error = load_input(partial(self.data_config.load, max_pixels=max_pixels), source)
        return ({self.data_config: image} if error is None else None), error

    @torch.inference_mode()
    def predict(self, inputs: list, ids: list[str]):
        x = self.data_config.to_tensor(np.stack([i[self.data_config] for i in inputs])).to(self.device)
        if self.cam is not None:
            maps, logits = self.cam(x)
            cams = maps.float().cpu().numpy()
        else:
            logits, cams = self.model(x), None
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        if self.temperature is not None:
            probs = apply_temperature(probs, self.temperature).astype(np.float32)
        errors = [None if np.isfinite(p).all() else "non-finite output from the model" for p in probs]
        probs[~np.isfinite(probs).all(axis=1)] = np.nan
        return ImagePredictions(probs, errors, {}, None, cams)
