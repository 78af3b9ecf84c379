"""A whole fine-tuning run: image table -> training (in-process or data-parallel) -> evaluation of
best.pt on val and test -> CAM localization -> the run directory's metrics and report.

`run` is what jobs/fine_tune.py calls once its flags are parsed and checked; the job supplies how
training processes are started (`launch`) and on which device, since that is where Spark lives.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import software
from common.runs import rundir
from common.data.bboxes import read_nih_bboxes
from common.evaluation.age_bands import AGE_BANDS
from common.evaluation.operating_points import DEFAULT_TARGETS
from common.evaluation.model_card import label_counts, write_card
from common.evaluation.scores import combine_probabilities, evaluate_splits, split_scores
from common.evaluation.subgroups import image_groups, source_name
from common.evaluation.text import averaged
from common.models.model_registry import get_spec
from common.data.image_table import ImageTable, table_from_flags
from common.training.losses import make_loss
from common.evaluation.report import render
from common.runs.safe_output import OutputLock
from common.features.store import SPLITS
from common.data.targets import apply_policy, eval_targets, label_columns, select_labels
from common.models.weights import WeightsSource, resolve_weights, weights_data_config
from finetune.checkpoint import load_classifier, resume_point, saved_identity
from finetune.config import BEST, FinetuneConfig, FinetuneError, SplitImages, identity_of, log
from finetune.decode_cache import DEFAULT_DIR
from finetune.localization import evaluate_localization
from finetune.loop import predict, train
from finetune.settings import FinetuneSettings, resolve_defaults

LOCALIZATION_DIR = rundir.LOCALIZATION


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
                                 targets, mask, eval_targets(labels[rows][:, cols]))
        flags[split] = rows
    return out, flags, labels


def evaluate_best(out: Path, score: Callable[[Path], tuple], label_names, age_bands=AGE_BANDS, calibrate: str = "none",
                  targets=DEFAULT_TARGETS):
    """best.pt on val and test: metrics and predictions (unreadable images left out), with `calibrate`
    "temperature" calibration.json fitted on val, the model and the unreadable images' paths.
    `score(path)`: score_checkpoint over the run's images."""
    model, scores, notes, unreadable = score(out / BEST)
    splits_metrics, thresholds, threshold_notes = evaluate_splits(scores, label_names, out, age_bands=age_bands,
                                                                  calibrate=calibrate, targets=targets)
    return model, splits_metrics, thresholds, notes + threshold_notes, unreadable


def score_checkpoint(path: Path, splits: dict[str, SplitImages], flag_rows: dict, labels: np.ndarray, label_names,
                     all_names, cfg: FinetuneConfig, device: torch.device, patient_ids: np.ndarray | None = None,
                     dataset: str | None = None, groups: dict[str, np.ndarray] | None = None):
    """A checkpoint's probabilities on val and test against the raw labels: (model, SplitScores per split,
    notes, unreadable paths). `patient_ids` (the table's, row for row) make the AUROC intervals
    patient-level; without them they resample images. `groups` (row for row too): who each image is,
    for the subgroup metrics and the predictions files."""
    model, _ = load_classifier(path, device)
    scores, notes, unreadable = {}, [], []
    for name in ("val", "test"):
        if name not in splits:
            continue
        s = splits[name]
        logits, ok = predict(model, s.dataset(cfg.data_config, train=False), cfg.batch_size * 2, device,
                             cfg.precision, cfg.num_workers)
        if not ok.all():
            notes.append(f"{name}: {int((~ok).sum())} unreadable images left out of the metrics")
            unreadable += [s.paths[i] for i in np.flatnonzero(~ok)]
        probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
        rows = flag_rows[name][ok]
        scores[name] = split_scores(np.asarray(s.ids, dtype=object)[ok], probs[ok], labels[rows], all_names,
                                    label_names, None if patient_ids is None else patient_ids[rows], dataset,
                                    None if groups is None else {k: v[rows] for k, v in groups.items()})
    return model, scores, notes, unreadable


def checkpoint_ensemble(out: Path, history: list[dict], k: int, best_metric: str, label_names: list[str],
                        score, age_bands=AGE_BANDS, targets=DEFAULT_TARGETS) -> dict | None:
    """The CheXpert paper's ensemble of one run's checkpoints: the k epochs best by `best_metric` (of
    those kept in checkpoints/), their val/test probabilities averaged and scored as any run
    (predictions/checkpoint-ensemble-<split>.parquet). `score(path)` -> (model, scores, notes, unreadable).
    None when fewer than two checkpoints were kept."""
    key = (lambda h: h["val_loss"]) if best_metric == "val_loss" else (lambda h: -h["val_auc"])
    ranked = sorted((h for h in history if np.isfinite(key(h))), key=key)
    files = {h["epoch"]: out / rundir.EPOCH_CHECKPOINTS / f"epoch-{h['epoch']:03d}.pt" for h in ranked}
    epochs = [e for e, f in files.items() if f.is_file()][:k]
    if len(epochs) < 2:
        return None
    members = [score(files[e])[1] for e in epochs]
    scores = {}
    for split in members[0]:
        ids = members[0][split].image_id
        if any(len(m[split].image_id) != len(ids) or (m[split].image_id != ids).any() for m in members):
            return {"epochs": epochs, "notes": [f"{split}: the checkpoints read different images; no ensemble"]}
        scores[split] = dataclasses.replace(members[0][split],
                                            probs=combine_probabilities([m[split].probs for m in members]))
    splits, thresholds, notes = evaluate_splits(scores, label_names, out, prefix="checkpoint-ensemble-",
                                                age_bands=age_bands, targets=targets)
    return {"epochs": epochs, "combine": "prob", "rule": f"the {k} epochs best by {best_metric}",
            "thresholds": dict(zip(label_names, thresholds.tolist())), "splits": splits, "notes": notes}


def localize(model, spec, box_file: str, table, label_names: list[str], data_config, device, out: Path,
             n_overlays: int, unreadable: set[str], split: str = "test") -> tuple[dict | None, list[str]]:
    """CAM boxes scored against the radiologists' boxes of `split`'s readable images."""
    boxes = read_nih_bboxes(box_file)
    paths = {i: p for i, p, s in zip(table["image_id"], table["path"], table["split"])
             if p not in unreadable and s == split}
    boxes = boxes[boxes["image_id"].isin(list(paths))]
    notes = []
    other = sorted(set(boxes["label"]) - set(label_names))
    if other:
        notes.append(f"localization: boxes of {', '.join(other)} skipped (not a trained label)")
        boxes = boxes[boxes["label"].isin(label_names)]
    if boxes.empty:
        return None, notes + [f"localization: no {split} image of this run has a box in {box_file}"]
    folder = out / LOCALIZATION_DIR
    table_acc = evaluate_localization(model, spec, boxes, paths, label_names, data_config, device, folder, n_overlays)
    result = {
        "box_list": str(box_file), "boxes": len(boxes), "images": int(boxes["image_id"].nunique()),
        "split": split, "input": data_config.describe(),
        "table": table_acc.to_dict(orient="records"),
        "overlays": sorted(f"{LOCALIZATION_DIR}/{p.name}" for p in folder.glob("*.png")),
    }
    return result, notes


def decode_cache_dir(settings: FinetuneSettings) -> str | None:
    """The decode cache's folder (absolute: the training processes may start elsewhere); None: no cache."""
    if settings.no_decode_cache:
        return None
    return str(Path(settings.decode_cache).resolve() if settings.decode_cache
               else Path(settings.out).resolve().parent / DEFAULT_DIR)


def prepare_out(out: str, overwrite: bool, identity: dict, epochs: int, inputs=()) -> tuple[Path, dict | None]:
    """The run directory: resumed when it holds an interrupted run of these settings, continued
    when it holds a finished one that ran out of epochs and more are asked for, else fresh; never
    a folder that holds one of `inputs` (the starting checkpoint). The caller holds its lock:
    nothing here may race another job's writes."""
    path = Path(out)
    rundir.check_not_input(path, inputs)
    marker = rundir.check_run_dir(path)  # a folder without the marker is refused before anything is read
    if overwrite or marker is None:
        return rundir.prepare(path, overwrite, kind="finetune", log=log), None
    finished = (path / rundir.METRICS).exists()
    resume = resume_point(path, identity)
    # A finished run's last.pt says how it stopped; an interrupted continuation of one says None.
    if resume is not None and finished and resume["stopped"] is not None:
        done = resume["epoch"] - 1
        if resume["stopped"] != "epochs" or done >= epochs:
            why = (f"it stopped early ({resume['stopped']})" if resume["stopped"] != "epochs"
                   else f"it ran {done} epochs; ask for more with --epochs to continue it")
            raise rundir.RunError(f"--out {out}: holds a finished run; {why}, or pass --overwrite to replace it")
        log(f"continuing the finished run in {out}: epochs {done + 1}-{epochs}")
    if resume is not None:
        return path, resume
    if marker.get("kind") == "finetune" and not finished:  # started but stopped before its first checkpoint
        return rundir.prepare(path, overwrite=True, kind="finetune", log=log), None
    return rundir.prepare(path, overwrite, kind="finetune", log=log), None


def _started(out: Path, resume: dict | None) -> str:
    """When the run began: now, or for a resumed run, when its first part did."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if resume and (out / rundir.CONFIG).is_file():
        return rundir.read_json(out / rundir.CONFIG).get("started", now)
    return now


@dataclasses.dataclass
class _RunImages:
    """The run's images: the table, the labels trained, each split's images, and the table's rows
    and label matrix their scores read (split_images)."""

    images: ImageTable
    label_names: list[str]
    splits: dict[str, SplitImages]
    flag_rows: dict
    labels: np.ndarray
    source: str  # where the images came from (subgroups.source_name), every row's source

    def scorer(self, cfg: FinetuneConfig, device: torch.device) -> Callable[[Path], tuple]:
        """score_checkpoint over these images: a checkpoint's path -> (model, scores, notes, unreadable)."""
        return partial(score_checkpoint, splits=self.splits, flag_rows=self.flag_rows, labels=self.labels,
                       label_names=self.label_names, all_names=self.images.label_names, cfg=cfg, device=device,
                       patient_ids=self.images.table["patient_id"].to_numpy(dtype=object),
                       dataset=self.images.dataset, groups=self.groups())

    def groups(self) -> dict[str, np.ndarray]:
        """Who each row of the table is: sex, age, view and source (common/evaluation/subgroups.py)."""
        t = self.images.table
        return image_groups(len(t), t["sex"].to_numpy(dtype=object), t["age"].to_numpy(dtype=np.float64),
                            t["view"].to_numpy(dtype=object), self.source)


def _read_images(settings: FinetuneSettings) -> _RunImages:
    """The settings' image table, labels and splits; a bad box file, a table without train or val images
    and a bad --loss fail here, before anything is written."""
    if settings.bbox_list:
        read_nih_bboxes(settings.bbox_list)  # a bad box file fails now, not after training
    images = table_from_flags(settings, log=log)  # reads the table flags by name, as from a Namespace
    label_names = select_labels(images.label_names, settings.labels, drop_no_finding=not settings.keep_no_finding)
    splits, flag_rows, labels = split_images(images.table, label_columns(images.label_names, label_names),
                                             settings.policy)
    for need in ("train", "val"):
        if need not in splits:
            raise FinetuneError(f"--metadata {settings.metadata}: no {need} images after splitting; "
                                "training needs train and val")
    # a bad --loss fails now
    make_loss(settings.loss, torch.zeros(1, len(label_names)), torch.ones(1, len(label_names)))
    return _RunImages(images, label_names, splits, flag_rows, labels, source_name(images.dataset, settings.to_dict()))


def _finetune_config(s: FinetuneSettings, data: _RunImages, weights: WeightsSource, data_config) -> FinetuneConfig:
    """What the training processes run, with the identity a resumed run must match."""
    cfg = FinetuneConfig(
        out=s.out, backbone=s.backbone, label_names=data.label_names, train=data.splits["train"],
        val=data.splits["val"], state_file=weights.path,
        init_seed=weights.seed if weights.kind == "random" else s.train_seed,
        data_config=data_config, model=s.model, model_options=dict(s.model_options),
        outputs_per_label=3 if s.policy == "multiclass" else 1,
        freeze_backbone=s.freeze_backbone, loss=s.loss, focal_gamma=s.focal_gamma,
        focal_alpha=s.focal_alpha, lr=s.lr, weight_decay=s.weight_decay, betas=s.betas,
        batch_size=s.batch_size, epochs=s.epochs, schedule=s.schedule, step_epochs=s.step_epochs,
        lr_factor=s.lr_factor, plateau_patience=s.plateau_patience,
        early_stop_patience=s.early_stop_patience, best_metric=s.best_metric, seed=s.train_seed,
        precision=s.precision, num_workers=s.num_workers, threads=s.threads,
        decode_cache=decode_cache_dir(s),
        checkpoint_every=s.checkpoint_every, keep_epoch_checkpoints=s.checkpoint_ensemble > 1,
        log_every=s.log_every, log_seconds=s.log_seconds, stop_after_steps=s.stop_after_steps,
        record=rundir.jsonable(s.to_dict()),
    )
    # The weights by content, not path; the policy and the process count shape training from outside cfg.
    cfg.identity = identity_of(cfg, weights=weights.label, weights_sha256=weights.sha256, policy=s.policy,
                               num_processes=s.num_processes)
    return cfg


def _config_record(command: str, data: _RunImages, weights: WeightsSource, data_config, settings: dict,
                   started: str) -> dict:
    """config.json: the flags, the command, the images, the weights and input, and when the run began."""
    return {
        "kind": "finetune",
        "settings": settings,
        "command": command,
        "dataset": data.images.dataset,
        "label_names": data.label_names,
        "weights": {"label": weights.label, "sha256": weights.sha256},
        "data_config": data_config.to_dict(),
        "images": {s: len(v) for s, v in data.splits.items()},
        # The training split's truth is in no predictions file: its counts, for the model card's prevalence.
        "label_counts": {"train": label_counts(*data.splits["train"].truth, data.label_names)},
        "split_method": data.images.split_method,
        "metadata_counts": data.images.counts,
        "started": started,
        "software": software("torch"),
    }


def _replicas_differ(out: Path, result: dict) -> bool:
    """Whether the training processes ended with different weights (a warning); a run that diverged
    in its first epoch, with no best checkpoint, fails."""
    if result["best_epoch"] == 0:
        raise FinetuneError(f"{out}: training diverged in its first epoch; no best checkpoint to evaluate")
    differ = len(set(result["rank_state_sha256"])) > 1
    if differ:
        log(f"warning: the {result['world_size']} processes ended with different weights: "
            f"{', '.join(d[:12] for d in result['rank_state_sha256'])}")
    return differ


def _ensemble(settings: FinetuneSettings, out: Path, result: dict, best_metric: str, label_names: list[str],
              score) -> dict | None:
    """With --checkpoint-ensemble K > 1, checkpoint_ensemble of the K best epochs; None otherwise."""
    if settings.checkpoint_ensemble <= 1:
        return None
    ensemble = checkpoint_ensemble(out, result["history"], settings.checkpoint_ensemble, best_metric, label_names,
                                   score, settings.age_bands, settings.operating_point)
    if ensemble and "splits" in ensemble:
        log("checkpoint ensemble of epochs " + ", ".join(map(str, ensemble["epochs"])) + ": "
            + ", ".join(f"{k} {averaged(label_names)} {v['summary']['mean_auc']:.4f}" for k, v in ensemble["splits"].items()))
    return ensemble


def _evaluate(settings: FinetuneSettings, spec, out: Path, data: _RunImages, cfg: FinetuneConfig, result: dict,
              device: str) -> dict:
    """metrics.json of a trained run: best.pt scored on val and test (on the training device when this
    process has it), the checkpoint ensemble, CAM localization, and the notes."""
    replicas_differ = _replicas_differ(out, result)
    eval_device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    cfg.precision = result["precision"] if eval_device.type == device else "fp32"
    score = data.scorer(cfg, eval_device)
    model, split_metrics, thresholds, eval_notes, eval_unreadable = evaluate_best(
        out, score, data.label_names, settings.age_bands, settings.calibrate, settings.operating_point)
    unreadable = sorted(set(result["unreadable"]) | set(eval_unreadable))
    ensemble = _ensemble(settings, out, result, cfg.best_metric, data.label_names, score)
    localization, loc_notes = None, []
    if settings.bbox_list:
        localization, loc_notes = localize(model, spec, settings.bbox_list, data.images.table, data.label_names,
                                           cfg.data_config, eval_device, out, settings.overlays, set(unreadable),
                                           settings.localize_split)
    notes = ([f"unreadable images ({len(unreadable)}), left out of training and metrics: "
              + ", ".join(Path(p).name for p in unreadable[:10]) + (", ..." if len(unreadable) > 10 else "")]
             if unreadable else [])
    notes += [f"{settings.num_processes} processes ended with different weights"] if replicas_differ else []
    return {
        "label_names": data.label_names,
        "best_epoch": result["best_epoch"],
        "stopped": result["stopped"],
        "train_seconds": result["train_seconds"],
        "history": result["history"],
        "grid": [],
        "thresholds": dict(zip(data.label_names, thresholds)),
        "splits": split_metrics,
        "localization": localization,
        **({"checkpoint_ensemble": ensemble} if ensemble else {}),
        "unreadable": unreadable,
        "training": {k: result[k] for k in ("global_step", "steps_per_epoch", "resumed_from", "world_size", "device",
                                            "precision", "rank_state_sha256", "seconds_this_run")},
        "notes": result["loss_notes"] + notes + eval_notes + loc_notes
                 + [n for m in split_metrics.values() for n in m["notes"]],
    }


def run(settings: FinetuneSettings, command: str, resolve_device: Callable[[], str],
        launch: Callable[[Callable, FinetuneConfig], dict]) -> dict:
    """Run the job of checked `settings`. `resolve_device()` names the training device once the run
    directory is ready; `launch(train, cfg)` runs training (in this process, or N by TorchDistributor)
    and returns rank 0's result."""
    spec = get_spec(settings.backbone)
    weights = resolve_weights(settings.backbone, settings.weights, download=settings.download_weights)
    # Fine-tuning a fine-tuned checkpoint keeps its input unless a flag changes it.
    data_config = weights_data_config(weights, settings.backbone, settings.input_size, settings.resize)
    from_scratch = weights.kind == "random"
    settings = resolve_defaults(settings, from_scratch, None if settings.overwrite else saved_identity(settings.out))
    if from_scratch:
        log(f"weights {weights.label}: random initialisation, as asked; the run records it; lr {settings.lr:g}, "
            f"best epoch by {settings.best_metric}, early-stop patience {settings.early_stop_patience}")
    data = _read_images(settings)
    cfg = _finetune_config(settings, data, weights, data_config)
    # One job per run directory, taken before deciding to resume or overwrite, held to the last file.
    with OutputLock(settings.out, log=log):
        out, resume = prepare_out(settings.out, settings.overwrite, cfg.identity, settings.epochs,
                                  inputs=[weights.path] if weights.path else [])
        device = resolve_device()
        cfg.out, cfg.device = str(out), device
        config = _config_record(command, data, weights, data_config, settings.to_dict(), _started(out, resume))
        rundir.write_json(out / rundir.CONFIG, config)
        log(f"{len(data.images.table)} images ({', '.join(f'{s} {len(v)}' for s, v in data.splits.items())}); "
            f"{settings.backbone} from {weights.label}, {len(data.label_names)} labels; "
            f"input {data_config.describe()}; "
            f"{settings.num_processes} process(es)"
            + (f"; resuming at epoch {resume['epoch']}, step {resume['step']}" if resume else ""))
        result = launch(train, cfg)
        if result["stopped"] == "interrupted":
            return {"run": str(out), **result}
        metrics = _evaluate(settings, spec, out, data, cfg, result, device)
        rundir.write_json(out / rundir.METRICS, metrics)
        config["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        rundir.write_json(out / rundir.CONFIG, config)
        render(out)
        write_card(out)
        split_metrics = metrics["splits"]
        summary = {"run": str(out), "stopped": result["stopped"], "best_epoch": result["best_epoch"],
                   **{f"{k}_mean_auc": v["summary"]["mean_auc"] for k, v in split_metrics.items()}}
        log(f"run complete: {out}; best epoch {result['best_epoch']} ({result['stopped']}); "
            + ", ".join(f"{k} {averaged(metrics['label_names'])} {v['summary']['mean_auc']:.4f}"
                        for k, v in split_metrics.items()))
        return {**result, **summary}
