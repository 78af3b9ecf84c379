"""A whole fine-tuning run: image table -> training (in-process or data-parallel) -> evaluation of
best.pt on val and test -> CAM localization -> the run directory's metrics and report.

`run` is what jobs/finetune.py calls once its flags are parsed and checked; the job supplies how
training processes are started (`launch`) and on which device, since that is where Spark lives.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import __version__, rundir
from common.backbones import get_spec
from common.bboxes import read_nih_bboxes
from common.evaluation import SplitScores, evaluate_splits
from common.image_table import table_from_flags
from common.losses import make_loss
from common.report import render
from common.store import SPLITS
from common.targets import apply_policy, eval_targets, finding_flags, label_columns, select_labels
from common.weights import resolve_weights
from finetune.checkpoint import load_classifier, resume_point
from finetune.config import BEST, FinetuneConfig, FinetuneError, SplitImages, log
from finetune.dataset import resize_size
from finetune.localization import evaluate_localization
from finetune.loop import predict, train

LOCALIZATION_DIR = "localization"


def split_images(table, cols: np.ndarray, policy: str) -> tuple[dict[str, SplitImages], dict, np.ndarray]:
    """Per split: the images with their targets and mask, and the finding flags for D-/N-AUC."""
    labels = np.stack(table["labels"].to_numpy()).astype(np.int8) if len(table) else np.zeros((0, 0), np.int8)
    out, flags = {}, {}
    for split in SPLITS:
        rows = np.flatnonzero((table["split"] == split).to_numpy())
        if not len(rows):
            continue
        targets, mask = apply_policy(labels[rows][:, cols], policy)
        out[split] = SplitImages(table["image_id"].iloc[rows].tolist(), table["path"].iloc[rows].tolist(),
                                 targets, mask)
        flags[split] = rows
    return out, flags, labels


def evaluate_best(out: Path, splits: dict[str, SplitImages], flag_rows: dict, labels: np.ndarray, label_names,
                  all_names, cfg: FinetuneConfig, device: torch.device):
    """best.pt on val and test: metrics and predictions (unreadable images left out), the model and
    the unreadable images' paths."""
    model, _ = load_classifier(out / BEST, device)
    scores, notes, unreadable = {}, [], []
    for name in ("val", "test"):
        if name not in splits:
            continue
        s = splits[name]
        logits, ok = predict(model, s.dataset(cfg.input_size, train=False), cfg.batch_size * 2, device,
                             cfg.precision, cfg.num_workers)
        if not ok.all():
            notes.append(f"{name}: {int((~ok).sum())} unreadable images left out of the metrics")
            unreadable += [s.paths[i] for i in np.flatnonzero(~ok)]
        has_disease, no_finding = finding_flags(labels[flag_rows[name]], all_names)
        probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
        # Scored on the raw labels, whatever the training policy (common/targets.py).
        y, mask = eval_targets(labels[flag_rows[name]][:, label_columns(all_names, label_names)])
        scores[name] = SplitScores(np.asarray(s.ids, dtype=object)[ok], probs[ok], y[ok], mask[ok],
                                   has_disease[ok], no_finding[ok])
    splits_metrics, thresholds, threshold_notes = evaluate_splits(scores, label_names, out)
    return model, splits_metrics, thresholds, notes + threshold_notes, unreadable


def localize(model, spec, box_file: str, table, label_names: list[str], input_size: int, device, out: Path,
             n_overlays: int, unreadable: set[str]) -> tuple[dict | None, list[str]]:
    """CAM boxes scored against the radiologists' boxes of the table's readable images (all splits)."""
    boxes = read_nih_bboxes(box_file)
    paths = {i: p for i, p in zip(table["image_id"], table["path"]) if p not in unreadable}
    boxes = boxes[boxes["image_id"].isin(list(paths))]
    notes = []
    other = sorted(set(boxes["label"]) - set(label_names))
    if other:
        notes.append(f"localization: boxes of {', '.join(other)} skipped (not a trained label)")
        boxes = boxes[boxes["label"].isin(label_names)]
    if boxes.empty:
        return None, notes + [f"localization: no image of this run has a box in {box_file}"]
    folder = out / LOCALIZATION_DIR
    table_acc = evaluate_localization(model, spec, boxes, paths, label_names, input_size, device, folder, n_overlays)
    split_of = dict(zip(table["image_id"], table["split"]))
    per_split = boxes["image_id"].drop_duplicates().map(split_of).value_counts().to_dict()
    result = {
        "box_list": str(box_file), "boxes": len(boxes), "images": int(boxes["image_id"].nunique()),
        "images_per_split": per_split, "input_size": input_size,
        "table": table_acc.to_dict(orient="records"),
        "overlays": sorted(f"{LOCALIZATION_DIR}/{p.name}" for p in folder.glob("*.png")),
    }
    return result, notes


def prepare_out(out: str, overwrite: bool, identity: dict) -> tuple[Path, dict | None]:
    """The run directory: resumed when it holds an interrupted run of these settings, else fresh."""
    path = Path(out)
    finished = (path / rundir.METRICS).exists()
    if not overwrite and not finished:
        resume = resume_point(path, identity)
        if resume is not None:
            return path, resume
        if (path / rundir.CONFIG).exists():  # started but stopped before its first checkpoint
            return rundir.prepare(path, overwrite=True), None
    return rundir.prepare(path, overwrite), None


def _ids_digest(ids: list[str]) -> str:
    return f"{len(ids)} images, sha256 {hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:16]}"


def _started(out: Path, resume: dict | None) -> str:
    """When the run began: now, or for a resumed run, when its first part did."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if resume and (out / rundir.CONFIG).is_file():
        return rundir.read_json(out / rundir.CONFIG).get("started", now)
    return now


def run(args: argparse.Namespace, command: str, resolve_device: Callable[[], str],
        launch: Callable[[Callable, FinetuneConfig], dict]) -> dict:
    """Run the job of checked flags `args`. `resolve_device()` names the training device once the run
    directory is ready; `launch(train, cfg)` runs training (in this process, or N by TorchDistributor)
    and returns rank 0's result."""
    spec = get_spec(args.backbone)
    input_size = args.input_size or spec.input_size
    weights = resolve_weights(args.backbone, args.weights, download=args.download_weights)
    if weights.kind == "random":
        log(f"weights {weights.label}: random initialisation, as asked; the run records it")
    if args.bbox_list:
        read_nih_bboxes(args.bbox_list)  # a bad box file fails now, not after training
    images = table_from_flags(args, log=log)
    table = images.table
    label_names = select_labels(images.label_names, args.labels, drop_no_finding=not args.keep_no_finding)
    splits, flag_rows, labels = split_images(table, label_columns(images.label_names, label_names), args.policy)
    for need in ("train", "val"):
        if need not in splits:
            raise FinetuneError(f"--metadata {args.metadata}: no {need} images after splitting; training needs train and val")
    make_loss(args.loss, torch.zeros(1, len(label_names)), torch.ones(1, len(label_names)))  # a bad --loss fails now

    settings = {k: v for k, v in sorted(vars(args).items()) if k != "config"}
    identity = {
        "backbone": args.backbone, "weights": weights.label, "weights_sha256": weights.sha256,
        "labels": label_names, "policy": args.policy, "input_size": input_size, "batch_size": args.batch_size,
        "num_processes": args.num_processes, "train_seed": args.train_seed, "freeze_backbone": args.freeze_backbone,
        "loss": args.loss, "train_images": _ids_digest(splits["train"].ids), "val_images": _ids_digest(splits["val"].ids),
    }
    out, resume = prepare_out(args.out, args.overwrite, identity)
    device = resolve_device()
    config = {
        "kind": "finetune",
        "settings": settings,
        "command": command,
        "dataset": images.dataset,
        "label_names": label_names,
        "weights": {"label": weights.label, "sha256": weights.sha256},
        "input_size": input_size,
        "resize_size": resize_size(input_size),
        "images": {s: len(v) for s, v in splits.items()},
        "split_method": images.split_method,
        "metadata_counts": images.counts,
        "started": _started(out, resume),
        "software": {"cxr-features": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
    }
    rundir.write_json(out / rundir.CONFIG, config)

    cfg = FinetuneConfig(
        out=str(out), backbone=args.backbone, label_names=label_names, train=splits["train"], val=splits["val"],
        state_file=weights.path, init_seed=weights.seed if weights.kind == "random" else args.train_seed,
        input_size=input_size, freeze_backbone=args.freeze_backbone, loss=args.loss, focal_gamma=args.focal_gamma,
        focal_alpha=args.focal_alpha, lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas),
        batch_size=args.batch_size, epochs=args.epochs, schedule=args.schedule, step_epochs=args.step_epochs,
        lr_factor=args.lr_factor, plateau_patience=args.plateau_patience,
        early_stop_patience=args.early_stop_patience, best_metric=args.best_metric, seed=args.train_seed,
        precision=args.precision, device=device, num_workers=args.num_workers, threads=args.threads,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, stop_after_steps=args.stop_after_steps,
        identity=identity, record=rundir.jsonable(settings),
    )
    log(f"{len(table)} images ({', '.join(f'{s} {len(v)}' for s, v in splits.items())}); {args.backbone} "
        f"from {weights.label}, {len(label_names)} labels, input {input_size} px; {args.num_processes} process(es)"
        + (f"; resuming at epoch {resume['epoch']}, step {resume['step']}" if resume else ""))
    result = launch(train, cfg)
    if result["stopped"] == "interrupted":
        return {"run": str(out), **result}
    if result["best_epoch"] == 0:
        raise FinetuneError(f"{out}: training diverged in its first epoch; no best checkpoint to evaluate")
    replicas_differ = len(set(result["rank_state_sha256"])) > 1
    if replicas_differ:
        log(f"warning: the {result['world_size']} processes ended with different weights: "
            f"{', '.join(d[:12] for d in result['rank_state_sha256'])}")

    eval_device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    cfg.precision = result["precision"] if eval_device.type == device else "fp32"
    model, split_metrics, thresholds, eval_notes, eval_unreadable = evaluate_best(
        out, splits, flag_rows, labels, label_names, images.label_names, cfg, eval_device)
    unreadable = sorted(set(result["unreadable"]) | set(eval_unreadable))
    localization, loc_notes = None, []
    if args.bbox_list:
        localization, loc_notes = localize(model, spec, args.bbox_list, table, label_names, input_size, eval_device,
                                           out, args.overlays, set(unreadable))
    notes = ([f"unreadable images ({len(unreadable)}), left out of training and metrics: "
              + ", ".join(Path(p).name for p in unreadable[:10]) + (", ..." if len(unreadable) > 10 else "")]
             if unreadable else [])
    notes += [f"{args.num_processes} processes ended with different weights"] if replicas_differ else []
    rundir.write_json(out / rundir.METRICS, {
        "label_names": label_names,
        "best_epoch": result["best_epoch"],
        "stopped": result["stopped"],
        "train_seconds": result["train_seconds"],
        "history": result["history"],
        "grid": [],
        "thresholds": dict(zip(label_names, thresholds)),
        "splits": split_metrics,
        "localization": localization,
        "unreadable": unreadable,
        "training": {k: result[k] for k in ("global_step", "steps_per_epoch", "resumed_from", "world_size", "device",
                                            "precision", "rank_state_sha256", "seconds_this_run")},
        "notes": result["loss_notes"] + notes + eval_notes + loc_notes
                 + [n for m in split_metrics.values() for n in m["notes"]],
    })
    config["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rundir.write_json(out / rundir.CONFIG, config)
    render(out)
    summary = {"run": str(out), "stopped": result["stopped"], "best_epoch": result["best_epoch"],
               **{f"{k}_mean_auc": v["summary"]["mean_auc"] for k, v in split_metrics.items()}}
    log(f"run complete: {out}; best epoch {result['best_epoch']} ({result['stopped']}); "
        + ", ".join(f"{k} mean AUROC {v['summary']['mean_auc']:.4f}" for k, v in split_metrics.items()))
    return {**result, **summary}


