"""The training function TorchDistributor runs: `train(cfg)` fine-tunes a registry model on images.

It runs alone (no WORLD_SIZE in the environment) or as one rank of a data-parallel run
(DistributedDataParallel; gloo on CPU, nccl on CUDA), resuming from last.pt when the run
directory holds one (finetune/checkpoint.py). Pure torch: no Spark here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common.models.architectures import build_model, is_architecture, plain_backbone_parts, training_loss
from common.models.checkpoint import read_checkpoint
from common.models.model_registry import get_spec
from common.runs.rundir import EPOCH_CHECKPOINTS
from common.config import epoch_line
from common.training.early_stopping import early_stop_line, judge_epoch, selection_value
from common.models.inference import autocast, resolve_precision
from common.training.losses import make_loss, multiclass_ce
from common.evaluation.metrics import fast_auroc, nanmean
from common.models.torch_files import save_atomic
from finetune.checkpoint import TrainState, checkpoint, load_scheduler, scheduler_state, state_sha256
from finetune.config import BEST, LAST, SCHEDULES, FinetuneConfig, FinetuneError, log
from finetune.dataset import ImageDataset
from finetune.decode_cache import open_cache
from finetune.distributed import Dist, setup
from finetune.sampler import EpochSampler


def predict(model: torch.nn.Module, dataset, batch_size: int, device: torch.device, precision: str,
            num_workers: int = 0, forward=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, K) float32 (or what `forward` gives) and ok flags (n,) of `dataset` in its order,
    the model in eval mode."""
    forward = forward or model
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    logits, oks = [], []
    try:
        with torch.inference_mode():
            for x, _y, _m, ok, _i in loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast(device.type, precision):
                    logits.append(forward(x).float().cpu())
                oks.append(ok)
    finally:
        model.train(was_training)
    if not logits:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        return np.zeros((0, base.targets.shape[1]), np.float32), np.zeros(0, bool)
    return torch.cat(logits).numpy(), torch.cat(oks).numpy().astype(bool)


def _backbone_parts(model: torch.nn.Module, spec) -> list[torch.nn.Module]:
    """The pretrained modules --freeze-backbone freezes: an architecture's own list, or the plain
    classifier's every child but its head."""
    return list(model.backbone_parts) if is_architecture(model) else plain_backbone_parts(model, spec.name)


def _set_train_mode(net: torch.nn.Module, model: torch.nn.Module, spec, frozen: bool) -> None:
    net.train()
    if frozen:
        # A frozen backbone runs as the extractor does: eval-mode BatchNorm, statistics untouched.
        for part in _backbone_parts(model, spec):
            part.eval()


def _make_scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs, gamma=cfg.lr_factor)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                          patience=cfg.plateau_patience)
    raise FinetuneError(f"--schedule {cfg.schedule!r}: choose from {', '.join(SCHEDULES)}")


def _validate(model, val: ImageDataset, loss_fn, cfg: FinetuneConfig, d: Dist, precision: str):
    """Val loss (on the policy's targets, as training) and mean AUROC (on the raw labels, as the
    metrics) of the whole split: each rank predicts every W-th image, rank 0 scores them all and
    broadcasts, so every rank takes the same decisions from the same numbers."""
    idx = np.arange(d.rank, len(val), d.world)
    three = getattr(model, "three_way", None)  # U-MultiClass: the loss takes the 3-way logits
    logits, ok = predict(model, Subset(val, idx.tolist()), cfg.batch_size, d.device, precision, cfg.num_workers,
                         forward=three)
    parts = d.all_gather((idx, logits, ok))
    values = None
    if d.main:
        idx = np.concatenate([p[0] for p in parts])
        order = np.argsort(idx, kind="stable")
        logits = np.concatenate([p[1] for p in parts])[order]
        ok = np.concatenate([p[2] for p in parts])[order]
        y, mask = val.targets.numpy(), val.mask.numpy().astype(bool) & ok[:, None]
        with torch.no_grad():
            loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y), torch.from_numpy(mask.astype(np.float32))))
        truth_y, truth_mask = cfg.val.truth if cfg.val.truth is not None else (y, mask)
        if three is not None:
            logits = logits[..., 2] - logits[..., 0]  # the renormalized positive logit, as evaluation reads it
        auc = nanmean(fast_auroc(truth_y, logits, np.asarray(truth_mask, bool) & ok[:, None]))
        values = (loss, auc, [val.paths[i] for i in np.flatnonzero(~ok)])
    return d.broadcast(values)


def _progress(state: TrainState, cfg: FinetuneConfig, steps: int, done: int, images: int, seconds: float,
              running: float) -> str:
    """`done` steps and `images` (all ranks) in `seconds` of this epoch's part in this run."""
    eta = time.strftime("%H:%M:%S", time.gmtime((steps - state.step) * seconds / max(done, 1)))
    return (f"epoch {state.epoch}/{cfg.epochs}  step {state.step}/{steps}  loss {running:.4f}  "
            f"{images / max(seconds, 1e-9):.1f} images/s  epoch ETA {eta}")


def train(cfg: FinetuneConfig) -> dict:
    """Train (or resume) the run in cfg.out; returns rank 0's summary on every rank."""
    d = setup(cfg.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    # Adam's moments of tiny gradients fall into denormal floats, which x86 handles very slowly.
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, d)
    finally:
        torch.set_num_threads(threads)  # an in-process caller keeps its own setting
        d.close()


def _train(cfg: FinetuneConfig, d: Dist) -> dict:
    run = _Training(cfg, d)
    while run.state.stopped is None and run.state.epoch <= cfg.epochs:
        t0 = time.perf_counter()
        run.train_epoch(t0)
        if run.interrupted:
            break
        run.end_epoch(t0)
    return d.broadcast(run.result())


def _loss(cfg: FinetuneConfig):
    """The loss training and validation use, and the notes on it."""
    if cfg.outputs_per_label == 3:  # U-MultiClass: the paper's 3-way cross-entropy, in training and validation
        return multiclass_ce, ["U-MultiClass: a 3-way softmax per observation trained with cross-entropy; "
                               "--loss not used"]
    return make_loss(cfg.loss, torch.from_numpy(cfg.train.targets), torch.from_numpy(cfg.train.mask.astype(np.float32)),
                     cfg.focal_gamma, cfg.focal_alpha, cfg.label_names)


class _Training:
    """One process's part of a run: the model and what trains it, the state last.pt saves (resumed
    from it when the run directory holds one), the data, and this run's counters."""

    def __init__(self, cfg: FinetuneConfig, d: Dist):
        self.cfg, self.d = cfg, d
        self.say = log if d.main else (lambda _m: None)
        self.out = Path(cfg.out)
        self.spec = get_spec(cfg.backbone)
        self.precision = resolve_precision(cfg.precision, d.device.type)
        if d.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        trainable = self._build()
        self.state, self.resumed = self._resume()
        self.net = self.model
        if d.on:
            self.net = DistributedDataParallel(self.model,
                                               device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self._open_data()
        self.sampler = EpochSampler(len(self.train_ds), cfg.batch_size, d.world, d.rank, cfg.seed)
        self.steps = self.sampler.steps_per_epoch
        self.unreadable = set(self.state.unreadable)
        self.say(f"{len(self.train_ds)} train / {len(self.val_ds)} val images; {d.world} process(es) on "
                 f"{d.device.type}, batch {cfg.batch_size} per process, {self.steps} steps per epoch; "
                 f"{self.precision}; {sum(p.numel() for p in trainable):,} trainable parameters"
                 + (" (head only)" if cfg.freeze_backbone else "") + f"; model {cfg.model}")
        self.run_steps, self.interrupted, self.started = 0, False, time.perf_counter()

    def _build(self) -> list[torch.nn.Parameter]:
        """The model, optimizer, schedule, gradient scaler and loss; returns the trainable parameters."""
        cfg, d = self.cfg, self.d
        model = build_model(cfg.model, cfg.backbone, cfg.state_file, cfg.init_seed, len(cfg.label_names),
                            cfg.model_options, cfg.outputs_per_label)
        if cfg.freeze_backbone:
            for part in _backbone_parts(model, self.spec):
                part.requires_grad_(False)
        # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
        self.model = model.to(d.device, memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                    fused=True)
        self.scheduler = _make_scheduler(self.opt, cfg)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.precision == "fp16")
        self.loss_fn, self.loss_notes = _loss(cfg)
        return trainable

    def _resume(self) -> tuple[TrainState, dict | None]:
        """The state of last.pt, its weights, optimizer, schedule, scaler and this rank's random
        streams loaded; a fresh state (dropout seeded per rank) when there is none."""
        d, last_file = self.d, self.out / LAST
        if not last_file.is_file():
            torch.manual_seed(self.cfg.seed + d.rank)  # dropout masks: a stream per rank
            return TrainState(), None
        last = read_checkpoint(last_file, finetune=True)
        obj = last.extra
        if obj.get("world_size") != d.world:
            raise FinetuneError(f"{last_file}: written by {obj.get('world_size')} processes, this run has {d.world}")
        self.model.load_state_dict(last.model_state)
        self.opt.load_state_dict(obj["optimizer"])
        load_scheduler(self.scheduler, obj["scheduler"], last_file)
        self.scaler.load_state_dict(obj["scaler"])
        state = TrainState(**obj["train_state"])
        rng = obj["rng"][d.rank]
        torch.set_rng_state(rng["cpu"])
        if d.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        if not d.main:  # rank 0 carries the epoch's loss so far; the epoch-end sum adds the rest
            state.loss_sum = state.loss_count = 0.0
        if state.stopped == "epochs" and state.epoch <= self.cfg.epochs:
            state.stopped = None  # more epochs asked for than the saved run had
        self.say(f"resuming from {last_file}: epoch {state.epoch}, step {state.step} (global step {state.global_step})")
        return state, {"epoch": state.epoch, "step": state.step, "global_step": state.global_step}

    def _open_data(self) -> None:
        """The train and val datasets, each over its decode cache when the run has one."""
        cfg, d = self.cfg, self.d
        self.train_ds = cfg.train.dataset(cfg.data_config, train=True, seed=cfg.seed)
        self.val_ds = cfg.val.dataset(cfg.data_config, train=False)
        if cfg.decode_cache:
            # Decoded once (per data config and image list) instead of every epoch. One process builds a
            # cache while the others wait on its lock, so the builder takes their decoding processes too.
            note = log if d.main else (lambda m: log(f"rank {d.rank}: {m}"))
            workers = min(cfg.num_workers * d.local_world, os.cpu_count() or 1) if cfg.num_workers else 0
            for ds in (self.train_ds, self.val_ds):
                ds.cache = open_cache(ds.paths, cfg.data_config, cfg.decode_cache, workers, log=note,
                                      announce=d.main, progress_seconds=cfg.log_seconds)

    def save_last(self) -> None:
        """last.pt: collectives on every rank (all reach the same step); the write on rank 0 only."""
        d, state = self.d, self.state
        totals = d.sum(state.loss_sum, state.loss_count)
        rngs = d.all_gather({"cpu": torch.get_rng_state(),
                             **({"cuda": torch.cuda.get_rng_state()} if d.device.type == "cuda" else {})})
        names = sorted(set().union(*d.all_gather(sorted(self.unreadable))))
        if d.main:
            saved = TrainState(**{**asdict(state), "loss_sum": totals[0], "loss_count": totals[1], "unreadable": names})
            save_atomic(checkpoint(self.model, self.cfg, saved, saved.epoch, optimizer=self.opt.state_dict(),
                                   scheduler=scheduler_state(self.scheduler), scaler=self.scaler.state_dict(),
                                   rng=rngs, world_size=d.world), self.out / LAST)

    def train_epoch(self, t0: float) -> None:
        """The epoch's steps from state.step on (a resumed epoch goes on where it stopped), started at
        `t0`; with --stop-after-steps reached, `interrupted` is set and last.pt saved."""
        cfg, d, state = self.cfg, self.d, self.state
        last_line = t0
        self.train_ds.epoch = state.epoch
        self.sampler.set_epoch(state.epoch, state.step)
        _set_train_mode(self.net, self.model, self.spec, cfg.freeze_backbone)
        # Its own generator: the loader's worker seeds then leave the global RNG (dropout) alone,
        # so a resumed epoch draws the same dropout masks as an uninterrupted one.
        loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
                            pin_memory=d.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + state.epoch))
        done, seen, seen_loss = 0, 0, 0.0
        for x, y, mask, ok, idx in loader:
            value = self._step(x, y, mask, ok, idx)
            n_ok = int(ok.sum())
            state.loss_sum += value * n_ok
            state.loss_count += n_ok
            done += 1
            seen += len(ok)
            seen_loss += value * n_ok
            state.step += 1
            state.global_step += 1
            self.run_steps += 1
            now = time.perf_counter()
            # Every log_every steps, and in slow epochs (few, long steps) every log_seconds as well.
            due = (cfg.log_every and state.step % cfg.log_every == 0) or (cfg.log_seconds and now - last_line >= cfg.log_seconds)
            if due and state.step < self.steps:
                self.say(_progress(state, cfg, self.steps, done, seen * d.world, now - t0, seen_loss / max(seen, 1)))
                last_line = now
            if cfg.stop_after_steps and self.run_steps >= cfg.stop_after_steps:
                self.interrupted = True
                break
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and state.step < self.steps:
                self.save_last()
        if self.interrupted:
            state.seconds += time.perf_counter() - t0
            self.save_last()
            self.say(f"stopping after {self.run_steps} steps as asked: epoch {state.epoch}, step {state.step} saved "
                     f"in {self.out / LAST}; run the same command again to resume")

    def _step(self, x, y, mask, ok, idx) -> float:
        """One optimizer step on a batch; its unreadable images (ok False) are noted and add no loss."""
        d = self.d
        if not ok.all():
            self.unreadable.update(self.train_ds.paths[i] for i in idx[~ok].tolist())
        x = x.to(d.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(d.device, non_blocking=True)
        mask = (mask * ok[:, None]).to(d.device, non_blocking=True)  # unreadable images add no loss
        with autocast(d.device.type, self.precision):
            outputs = self.net(x)
        loss = training_loss(self.model, outputs, y, mask, self.loss_fn)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.item()

    def end_epoch(self, t0: float) -> None:
        """Validation, the schedule's step, the verdict (common/training/early_stopping.judge_epoch),
        best.pt and the epoch's own checkpoint; then the next epoch's start saved in last.pt."""
        cfg, d, state, out = self.cfg, self.d, self.state, self.out
        total, count = d.sum(state.loss_sum, state.loss_count)
        d.sync_buffers(self.model)
        val_loss, val_auc, val_bad = _validate(self.model, self.val_ds, self.loss_fn, cfg, d, self.precision)
        self.unreadable.update(val_bad)
        row = {"epoch": state.epoch, "train_loss": total / count if count else math.nan, "val_loss": val_loss,
               "val_auc": val_auc, "lr": self.opt.param_groups[0]["lr"]}
        value = selection_value(cfg.best_metric, val_loss, val_auc)
        if cfg.schedule == "plateau":
            # On the metric that picks the epoch: a from-scratch run's val loss can sit near ln 2 while its
            # AUROC climbs, and decaying on it would cut the rate just as the model starts to rank.
            self.scheduler.step(value if math.isfinite(value) else math.inf)
        else:
            self.scheduler.step()
        row["seconds"] = time.perf_counter() - t0  # validation included
        state.seconds += row["seconds"]
        state.history.append(row)
        verdict = judge_epoch(row["train_loss"], val_loss, value, state.best_value, state.best_epoch,
                              state.bad_epochs, cfg.early_stop_patience)
        state.bad_epochs = verdict.bad_epochs
        if verdict.improved:
            state.best_epoch, state.best_value = state.epoch, value if math.isfinite(value) else math.inf
            state.best_val_loss, state.best_val_auc = val_loss, val_auc
            if d.main:
                save_atomic(checkpoint(self.model, cfg, state, state.epoch), out / BEST)
        if verdict.stopped != "diverged" and cfg.keep_epoch_checkpoints and d.main:
            (out / EPOCH_CHECKPOINTS).mkdir(exist_ok=True)
            save_atomic(checkpoint(self.model, cfg, state, state.epoch),
                        out / EPOCH_CHECKPOINTS / f"epoch-{state.epoch:03d}.pt")
        self.say(epoch_line(row, cfg.epochs, verdict.mark))
        state.stopped = verdict.stopped
        if verdict.stopped == "early_stop":
            self.say(early_stop_line(cfg.best_metric, state.bad_epochs, state.best_epoch))
        state.epoch, state.step, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0.0
        if state.stopped is None and state.epoch > cfg.epochs:
            state.stopped = "epochs"
        self.save_last()

    def result(self) -> dict:
        """This rank's summary of the run (collectives on every rank: the weights' digests, the unreadable images)."""
        d, state = self.d, self.state
        digests = d.all_gather(state_sha256(self.model.state_dict()))
        return {
            "history": state.history,
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss,
            "best_val_auc": state.best_val_auc,
            "stopped": "interrupted" if self.interrupted else (state.stopped or "epochs"),
            "epoch": state.epoch,
            "step": state.step,
            "global_step": state.global_step,
            "steps_per_epoch": self.steps,
            "steps_this_run": self.run_steps,
            "resumed_from": self.resumed,
            "train_seconds": round(state.seconds, 2),
            "seconds_this_run": round(time.perf_counter() - self.started, 2),
            "unreadable": sorted(set().union(*d.all_gather(sorted(self.unreadable)))),
            "loss_notes": self.loss_notes,
            "rank_state_sha256": digests,
            "world_size": d.world,
            "device": d.device.type,
            "precision": self.precision,
        }
