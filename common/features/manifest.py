"""An extraction run's manifest.json (docs/feature-store.md): what made the store, from its plan."""

from __future__ import annotations

import datetime as dt

from common import software
from common.data.image_table import ImageTable
from common.features.plan import ExtractPlan
from common.features.store import FORMAT_VERSION

PRECISION_RULE = ("auto: bf16 autocast on CPUs with native bf16 (else fp32), fp16 autocast on CUDA; "
                  "features stored as float32")
RANDOM_NOTE = "random initialisation (asked for explicitly): features carry no learned knowledge"


def store_manifest(plan: ExtractPlan, images: ImageTable, written: dict, *, flags: dict, command: str,
                   qa_rule: str | None = None) -> dict:
    """The manifest of a store `plan` wrote from `images`: `written` is what compaction made of it (files,
    splits, errors, ran, feature_stats, lung_qa), `flags` the job's checked flags (its `config`, with the store
    and the model as the plan resolved them), `command` its command line, `qa_rule` what a masked store's
    lung_qa values mean (lungs.masking.QA_RULE)."""
    device, precision = written["ran"].split("/") if written["ran"] else (None, None)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": images.dataset,
        "label_names": list(images.label_names),
        "feature_dim": plan.feature_dim,
        "backbone": plan.backbone,
        "model": plan.model,
        "weights": plan.weights.label,
        "weights_sha256": plan.weights.sha256,
        "data_config": plan.data_config.to_dict(),
        "device": device,
        "precision": precision,
        "precision_requested": plan.precision,
        "precision_rule": PRECISION_RULE,
        "feature_stats": written["feature_stats"],
        "files": written["files"],
        "view": plan.view,
        "splits": written["splits"],
        "split_method": images.split_method,
        "errors": written["errors"],
        "metadata_counts": images.counts,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software("torch", "torchvision", "pyspark"),
        "command": command,
        "config": dict(sorted({**flags, "out": plan.out, "model": plan.model, "feature_dim": plan.feature_dim}.items())),
    }
    if plan.lungs:
        manifest["lungs"] = {**plan.lung_model, "qa_counts": written["lung_qa"], "qa_rule": qa_rule,
                             "masks_dir": plan.masks_dir}
    if plan.weights.kind == "random":
        manifest["weights_note"] = RANDOM_NOTE
    return manifest
