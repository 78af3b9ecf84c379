"""Fine-tune a registry model end to end on chest X-ray images; its checkpoints feed jobs/extract.py.

    python jobs/finetune.py --dataset nih --metadata Data_Entry_2017.csv --images images/ \
        --backbone densenet121 --weights imagenet --out runs/nih-densenet121-ft
    python jobs/finetune.py --config conf/finetune.toml --num-processes 4 --out runs/x   # TorchDistributor

The driver builds the same image table as the extraction job (metadata, located images,
patient-level splits), then trains: in this process with --num-processes 1 (no Spark), or as
N data-parallel processes started by Spark's TorchDistributor (local mode on this machine, or
barrier tasks on a cluster's executors). A run directory that holds an interrupted run's
last.pt is resumed. The best checkpoint is then evaluated on val and test with the head
trainer's metrics, CAM localization is scored against NIH's boxes when --bbox-list is given,
and the run directory gets the same files and report as a head run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from common import __version__
from common.backbones import WeightsError, get_spec, resolve_weights
from common.bboxes import read_nih_bboxes
from common.config import ConfigError, parse_with_config, require
from common.dataset import add_table_flags, table_from_flags
from common.finetune import (BEST, BEST_METRICS, SCHEDULES, FinetuneConfig, FinetuneError,
                             SplitImages, load_classifier, log, predict, resume_point, train)
from common.image_dataset import resize_size
from common.inference import PRECISIONS
from common.store import SPLITS, StoreError
from heads import rundir
from heads.cli import HelpFormatter, add_loss_flags, parse_list
from heads.data import POLICIES, apply_policy, finding_flags, label_columns, select_labels
from heads.evaluation import SplitScores, evaluate_splits
from heads.localization import CAM_LAYERS, evaluate_localization
from heads.losses import make_loss
from heads.report import render

LOCALIZATION_DIR = "localization"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/finetune.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="TOML file whose [finetune] table sets defaults for these flags (e.g. conf/finetune.toml)")
    a("--out", help="run directory; an interrupted run there is resumed")
    a("--overwrite", action="store_true", help="replace a finished (or interrupted) run at --out")
    g = p.add_argument_group("images and their patient-level split (as jobs/extract.py)")
    add_table_flags(g)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="densenet121", help="registry name, e.g. densenet121, resnet50, inception_v3")
    g.add_argument("--weights", default="imagenet",
                   help="starting weights: imagenet[:ENUM], a checkpoint path (a fine-tune checkpoint too), or random[:SEED]")
    g.add_argument("--download-weights", action="store_true", help="fetch ImageNet weights if not cached")
    g.add_argument("--input-size", type=int, default=None,
                   help="crop size (default: the backbone's, 224; e.g. 320); images are resized to size/0.875 first")
    g.add_argument("--freeze-backbone", action="store_true", help="train the new classifier only")
    g = p.add_argument_group("labels and loss (as heads.train)")
    g.add_argument("--labels", default="all", help="all | competition (CheXpert's five) | comma-separated names")
    g.add_argument("--keep-no-finding", action="store_true", help="also train on a 'No Finding' label")
    g.add_argument("--policy", default="ignore", help=f"uncertain (-1) labels: {' | '.join(POLICIES)}")
    add_loss_flags(g)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--betas", default="0.9,0.999", help="Adam betas, comma-separated")
    g.add_argument("--batch-size", type=int, default=16, help="images per step and process")
    g.add_argument("--epochs", type=int, default=20, help="at most this many epochs")
    g.add_argument("--schedule", default="plateau",
                   help=f"{' | '.join(SCHEDULES)}: ReduceLROnPlateau on val loss, or x lr-factor every step-epochs")
    g.add_argument("--lr-factor", type=float, default=0.1, help="learning-rate multiplier of either schedule")
    g.add_argument("--step-epochs", type=int, default=10, help="step schedule: epochs between decays")
    g.add_argument("--plateau-patience", type=int, default=1, help="plateau schedule: epochs without a lower val loss")
    g.add_argument("--early-stop-patience", type=int, default=3, help="epochs without a better best-metric; 0 = never")
    g.add_argument("--best-metric", default="val_loss", help=f"{' | '.join(BEST_METRICS)}: picks best.pt and early stopping")
    g.add_argument("--train-seed", type=int, default=0, help="classifier init, batch order, augmentation")
    g = p.add_argument_group("machine")
    g.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes; >1 runs through Spark's TorchDistributor")
    g.add_argument("--local-mode", action=argparse.BooleanOptionalAction, default=True,
                   help="TorchDistributor: all processes on this machine (else one per Spark task on the executors)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA where this machine (local mode) or the Spark tasks (cluster) have GPUs")
    g.add_argument("--precision", default="auto", help=f"{' | '.join(PRECISIONS)}; auto: fp16 on CUDA, bf16 on a CPU "
                                                       "with native bf16, else fp32 (autocast; weights stay fp32)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding images, per process")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between last.pt saves (and every epoch end)")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines within an epoch; 0: none")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop after this many steps, with last.pt saved; the same command resumes (time-boxed jobs)")
    g = p.add_argument_group("localization")
    g.add_argument("--bbox-list", help="NIH BBox_List_2017.csv: score CAM boxes of the images that have boxes")
    g.add_argument("--overlays", type=int, default=8, help="heatmap overlays saved as PNG (first images with boxes)")
    return p


def check_settings(args: argparse.Namespace) -> None:
    """Refuse bad flags before any work; --betas becomes its list of floats."""
    require(args, "metadata", "images", "out")
    for key, allowed in (("policy", POLICIES), ("schedule", SCHEDULES), ("best_metric", BEST_METRICS),
                         ("precision", PRECISIONS)):
        if getattr(args, key) not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(args, key)!r}: choose from {', '.join(allowed)}")
    for key in ("batch_size", "epochs", "num_processes", "input_size", "step_epochs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    args.betas = parse_list(args.betas, float, "betas")
    if len(args.betas) != 2:
        raise ConfigError(f"--betas {args.betas!r}: give two values")
    if args.device == "cuda" and not (args.num_processes > 1 and not args.local_mode) and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda: torch.cuda.is_available() is False here (torch {torch.__version__})")
    if args.bbox_list and args.backbone not in CAM_LAYERS:
        raise ConfigError(f"--bbox-list: CAM is defined for {', '.join(CAM_LAYERS)}, not {args.backbone}")


def resolve_device(args: argparse.Namespace) -> str:
    """cpu or cuda for the training processes; on a cluster (--no-local-mode) the executors decide."""
    on_executors = args.num_processes > 1 and not args.local_mode
    if args.device != "auto":
        return args.device
    if on_executors:
        # TorchDistributor gives each task its GPUs when Spark's tasks have a GPU resource.
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        amount = spark.conf.get("spark.task.resource.gpu.amount", None) if spark else None
        return "cuda" if amount and float(amount) > 0 else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_spark(device: str):
    """This machine's Spark session; TorchDistributor's local mode takes GPUs from the driver's resources."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.appName("cxr-features finetune")
               .config("spark.ui.showConsoleProgress", "false"))
    if device == "cuda":
        script = Path(__file__).resolve().parents[1] / "conf" / "spark" / "gpu-discovery.sh"
        builder = (builder.config("spark.driver.resource.gpu.amount", str(torch.cuda.device_count()))
                   .config("spark.driver.resource.gpu.discoveryScript", str(script)))
    return builder.getOrCreate()


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
        scores[name] = SplitScores(np.asarray(s.ids, dtype=object)[ok], probs[ok], s.targets[ok], s.mask[ok],
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


def main(argv: list[str] | None = None, spark=None) -> dict:
    """Run the job; `spark`: a session to run TorchDistributor on (else one is made for N > 1)."""
    args = parse_with_config(build_parser(), argv, "finetune")
    check_settings(args)
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
    if spark is None and args.num_processes > 1:  # TorchDistributor runs on the active session
        get_spark("cuda" if args.local_mode and args.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = resolve_device(args)
    command = shlex.join(sys.argv if argv is None else ["jobs/finetune.py", *argv])
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
    if args.num_processes == 1:
        result = train(cfg)
    else:
        from pyspark.ml.torch.distributor import TorchDistributor

        distributor = TorchDistributor(num_processes=args.num_processes, local_mode=args.local_mode,
                                       use_gpu=device == "cuda")
        result = distributor.run(train, cfg)
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


def cli() -> None:
    try:
        main()
    except (rundir.RunError, WeightsError, StoreError, ValueError, FileNotFoundError) as exc:
        # One line for bad input; tracebacks are for bugs.
        print(f"jobs/finetune.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
