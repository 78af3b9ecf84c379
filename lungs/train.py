"""Train a lung U-Net on image/mask pairs, then score it: the whole run behind `jobs/lung_model.py train`.

Dice + BCE loss, Adam, the learning rate halved when val Dice stalls, early stopping on val Dice,
and a wall-clock cap (--max-minutes) that stops cleanly. The best checkpoint (best.pt) is saved
atomically whenever val Dice improves, so a stop at any time leaves the best model so far.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from common.config import log
from common.data.splits import assign_groups
from common.models.inference import autocast, resolve_precision
from common.runs.rundir import BEST, CONFIG, METRICS, prepare, write_json
from common.runs.safe_output import OutputLock
from lungs.data import SPLITS, augment, load_pairs, pair_files
from lungs.evaluate import mean_dice, score
from lungs.model import build_model, load_lung_model, read_lung_checkpoint, save_lung_model
from lungs.report import write_overlays, write_report
from lungs.settings import LungEvaluateSettings, LungTrainSettings


def setup_device(device: str, threads: int | None) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch.cuda.is_available() is False here (torch {torch.__version__})")
    # All the cores this process may use (its affinity, not the host's count): it is the machine's one job.
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return device


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE for every pixel plus soft Dice per image: BCE gives smooth early gradients, Dice ignores
    the large easy background."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + (1 - dice).mean()


def train_steps(model, opt, images, masks, generator, batch_size, device, precision, flip, deadline=None,
                max_steps=None, films: float = 0.0) -> tuple[float, int, bool]:
    """One pass over (N, S, S) arrays in a seeded order; (mean loss, steps, stopped by the deadline)."""
    model.train()
    order = torch.randperm(len(images), generator=generator).numpy()
    total, steps = 0.0, 0
    for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
        idx = order[start:start + batch_size]
        x = torch.from_numpy(images[idx])[:, None]
        y = torch.from_numpy(masks[idx].astype(np.float32))[:, None]
        x, y = augment(x, y, generator, flip=flip, films=films)
        x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
        with autocast(device, precision):
            logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
        steps += 1
        if (deadline and time.monotonic() > deadline) or (max_steps and steps >= max_steps):
            return total / steps, steps, bool(deadline and time.monotonic() > deadline)
    return total / max(steps, 1), steps, False


def data_source(images: str, masks: str, split: dict, seed: int, fractions) -> dict:
    return {"images": str(Path(images).resolve()), "masks": str(Path(masks).resolve()), "split_seed": seed,
            "split_fractions": list(fractions), "split": split}


def training_precision(requested: str, device: str) -> str:
    precision = resolve_precision(requested, device)
    if precision == "fp16":  # fp16 training needs loss scaling; bf16 does not and is as fast where it exists
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return precision


def stop_reason(settings: LungTrainSettings, timed_out: bool, since_best: int) -> str | None:
    """Why training stops after this epoch (--max-minutes, --max-steps, --patience), or None."""
    if timed_out:
        return f"--max-minutes {settings.max_minutes} reached"
    if settings.max_steps:
        return f"--max-steps {settings.max_steps}"
    if settings.patience and since_best >= settings.patience:
        return f"no better val Dice in {settings.patience} epochs"
    return None


def train_epochs(model, loaded: dict, settings: LungTrainSettings, device: str, precision: str, started: float,
                 save_best) -> tuple[list, float, str]:
    """Train `model` on loaded["train"] epoch by epoch, calling save_best(val_dice, epoch) on each better val
    Dice; (history, best val Dice, why it stopped)."""
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=settings.lr_patience)
    generator = torch.Generator().manual_seed(settings.seed)
    deadline = started + settings.max_minutes * 60 if settings.max_minutes else None
    history, best, since_best, stop = [], -1.0, 0, None
    val = loaded["val"] if loaded["val"].stems else loaded["train"]
    for epoch in range(1, settings.epochs + 1):
        t0 = time.monotonic()
        train_loss, steps, timed_out = train_steps(model, opt, loaded["train"].images, loaded["train"].masks,
                                                   generator, settings.batch_size, device, precision, settings.flip,
                                                   deadline, settings.max_steps, settings.films)
        model.eval()
        val_dice = mean_dice(model, val)
        sched.step(val_dice)
        row = {"epoch": epoch, "train_loss": train_loss, "val_dice": val_dice, "steps": steps,
               "lr": opt.param_groups[0]["lr"], "seconds": time.monotonic() - t0}
        history.append(row)
        mark = ""
        if val_dice > best:
            best, since_best, mark = val_dice, 0, "  * best"
            save_best(val_dice, epoch)
        else:
            since_best += 1
        log(f"[lungs] epoch {epoch:3d}/{settings.epochs}  loss {train_loss:.4f}  val_dice {val_dice:.4f}  "
            f"lr {row['lr']:.1e}  {row['seconds']:.0f}s{mark}")
        stop = stop_reason(settings, timed_out, since_best)
        if stop:
            break
    return history, best, stop or "epochs"


def split_of(settings: LungTrainSettings, stems: list[str]) -> tuple[dict, dict | None]:
    """{split: stems} and the --init checkpoint (None without one). Training on from a model keeps that model's
    own split, so its val and test patients stay unseen; pairs it never saw join train."""
    if not settings.init:
        # Each stem is its own patient: Shenzhen holds one image per patient.
        owner = assign_groups(stems, settings.split, settings.split_seed, flag="--split")
        return {s: [stem for stem in stems if owner[stem] == s] for s in SPLITS}, None
    init = read_lung_checkpoint(settings.init)
    config = {"size": settings.size, "base": settings.base, "depth": settings.depth}
    if {k: int(v) for k, v in init["config"].items()} != config:
        raise ValueError(f"--init {settings.init}: a U-Net of {init['config']}, not the --size/--base/--depth {config}")
    recorded = init.get("data", {}).get("split", {})
    held = {stem for s in ("val", "test") for stem in recorded.get(s, [])}
    split = {s: [stem for stem in stems if stem in set(recorded.get(s, []))] for s in ("val", "test")}
    return {"train": [stem for stem in stems if stem not in held], **split}, init


def run_train(settings: LungTrainSettings, command: str) -> dict:
    """Train per `settings` into run directory settings.out; returns metrics.json's dict."""
    device = setup_device(settings.device, settings.threads)
    precision = training_precision(settings.precision, device)
    torch.manual_seed(settings.seed)
    pairs = pair_files(settings.images, settings.masks)
    for line in pairs.unpaired:
        log(f"[lungs] {line}")
    split, init = split_of(settings, pairs.stems)
    with OutputLock(settings.out):
        out = prepare(settings.out, settings.overwrite, kind="lungs", log=lambda m: log(f"[lungs] {m}"),
                      inputs=[settings.images, settings.masks])
        loaded = {s: load_pairs(pairs, split[s], settings.size, log=lambda m: log(f"[lungs] {m}")) for s in SPLITS}
        log(f"[lungs] {len(pairs.stems)} pairs: " + ", ".join(f"{s}={len(loaded[s].stems)}" for s in SPLITS)
            + f"; {device}, {precision}, {torch.get_num_threads()} threads")
        if len(loaded["train"].stems) == 0:
            raise ValueError(f"--images {settings.images}: no training pair left after the split")
        config = {"size": settings.size, "base": settings.base, "depth": settings.depth}
        source = data_source(settings.images, settings.masks, {s: loaded[s].stems for s in SPLITS}, settings.split_seed,
                             settings.split)
        write_json(out / CONFIG, {"kind": "lungs", "command": command, "settings": settings.to_dict(), "model": config,
                                  "data": {k: v for k, v in source.items() if k != "split"}, "device": device,
                                  "precision": precision, "torch": torch.__version__, "python": platform.python_version(),
                                  "unpaired": pairs.unpaired})
        model = build_model(config)
        if init:
            model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in init["state_dict"].items()})
            log(f"[lungs] --init {settings.init}: its weights and its split")
        model = model.to(device).to(memory_format=torch.channels_last)
        started = time.monotonic()

        def save_best(val_dice: float, epoch: int) -> None:
            save_lung_model(model, config, out / BEST, source, {"val_dice": val_dice, "epoch": epoch})

        history, best, stop = train_epochs(model, loaded, settings, device, precision, started, save_best)
        log(f"[lungs] stopped: {stop}; best val Dice {best:.4f}")
        best_model, _ = load_lung_model(out / BEST, device)
        metrics, arrays = {}, {}
        for s in SPLITS:
            metrics[s], arrays[s] = score(best_model, loaded[s])
        result = {"splits": metrics, "history": history, "stopped": stop, "best_val_dice": best,
                  "minutes": (time.monotonic() - started) / 60}
        # The checkpoint carries its own scores, so a shipped model tells what it measured.
        save_lung_model(best_model, config, out / BEST, source,
                        {s: {"raw": metrics[s]["raw"], "post": metrics[s]["post"]} for s in SPLITS})
        write_json(out / METRICS, result)
        shown = "test" if loaded["test"].stems else "val"
        overlays = write_overlays(out, loaded[shown], arrays[shown]) if loaded[shown].stems else []
        report = write_report(out, "Lung segmentation run", command, {s: metrics[s] for s in SPLITS}, history,
                              overlays, [f"stopped: {stop}", *pairs.unpaired[:5],
                                         *[x for s in SPLITS for x in loaded[s].skipped][:5]])
        log(f"[lungs] report: {report}")
        return result


def run_evaluate(settings: LungEvaluateSettings, command: str) -> dict:
    """Score a model (a checkpoint or "default") on every pair of --images/--masks into run directory settings.out."""
    device = setup_device(settings.device, settings.threads)
    model, config = load_lung_model(settings.model, device)
    pairs = pair_files(settings.images, settings.masks)
    for line in pairs.unpaired:
        log(f"[lungs] {line}")
    stems = pairs.stems
    if settings.split != "all":
        recorded = read_lung_checkpoint(settings.model).get("data", {}).get("split", {})
        if settings.split not in recorded:
            raise ValueError(f"--split {settings.split}: --model {settings.model} records no split of its training run")
        stems = sorted(set(stems) & set(recorded[settings.split]))
        if not stems:
            raise ValueError(f"--split {settings.split}: none of the model's {settings.split} images pair up in "
                             "--images/--masks")
    with OutputLock(settings.out):
        out = prepare(settings.out, settings.overwrite, kind="lungs-evaluation", log=lambda m: log(f"[lungs] {m}"),
                      inputs=[settings.images, settings.masks,
                              *([] if settings.model == "default" else [settings.model])])
        write_json(out / CONFIG, {"kind": "lungs-evaluate", "command": command, "settings": settings.to_dict(),
                                  "model": config, "device": device, "torch": torch.__version__})
        loaded = load_pairs(pairs, stems, config["size"], log=lambda m: log(f"[lungs] {m}"))
        metrics, arrays = score(model, loaded, worst=settings.worst)
        result = {"splits": {settings.split: metrics}, "unpaired": pairs.unpaired}
        write_json(out / METRICS, result)
        overlays = write_overlays(out, loaded, arrays) if loaded.stems else []
        report = write_report(out, "Lung segmentation evaluation", command, {settings.split: metrics}, None, overlays,
                              [*pairs.unpaired[:5], *loaded.skipped[:5]])
        r, p = metrics["raw"], metrics["post"]
        if r["n"]:
            log(f"[lungs] {r['n']} images: Dice {r['dice']:.4f} IoU {r['iou']:.4f}; after post-processing "
                f"Dice {p['dice']:.4f} IoU {p['iou']:.4f}")
        log(f"[lungs] report: {report}")
        return result
