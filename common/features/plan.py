"""An extraction run's plan: what it does, decided once on the driver from its checked flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.features.store import FORMAT_VERSION
from common.images.data_config import DataConfig

if TYPE_CHECKING:
    from common.models.weights import WeightsSource


@dataclass(frozen=True)
class ExtractPlan:
    """Everything a run of jobs/extract.py does, made once from its checked flags (jobs.extract.make_plan) and
    changed by nothing after: small enough to travel to every Spark task, where
    common.features.extraction.make_embed_fn builds its models."""

    out: str  # the store: an absolute local folder, or a URI
    backbone: str
    model: str  # "classifier" (the backbone's pooled features), or a fine-tune checkpoint's architecture
    feature_dim: int
    weights: WeightsSource
    data_config: DataConfig
    device: str  # auto (the task's GPU when it has one) | cpu
    precision: str
    batch_size: int
    chunk_size: int
    images_per_task: int
    prefetch_batches: int
    file_mb: int
    max_pixels: int
    progress_interval: float
    stall_timeout: float
    overwrite: bool
    lungs: dict | None = None  # --view masked: the lung model (lungs.masking.lung_model_source)
    masks_dir: str | None = None  # --save-masks, an absolute local folder

    @property
    def view(self) -> str:
        return "original" if self.lungs is None else "masked"

    @property
    def lung_model(self) -> dict | None:
        """The lung model as the store records it: its source without the driver's path."""
        return {k: v for k, v in self.lungs.items() if k != "path"} if self.lungs else None

    def settings(self) -> dict:
        """What decides the store's rows: its plan's fingerprint (store_writer.plan_fingerprint), so a run with
        other settings never resumes another's chunks."""
        settings = {"backbone": self.backbone, "model": self.model, "weights": self.weights.label,
                    "weights_sha256": self.weights.sha256, "data_config": self.data_config.to_dict(),
                    "precision": self.precision, "chunk_size": self.chunk_size, "format_version": FORMAT_VERSION}
        if self.lungs:
            settings["lungs"] = self.lung_model
        return settings
