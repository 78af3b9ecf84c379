"""Fine-tuning a registry model end to end on images: the function TorchDistributor runs.

`train(cfg)` runs alone (no WORLD_SIZE in the environment) or as one rank of a data-parallel
run (DistributedDataParallel; gloo on CPU, nccl on CUDA). Pure torch: no Spark here.

The run directory `cfg.out` receives, from rank 0 only, each written atomically:

    last.pt   every `checkpoint_every` steps and at each epoch end: weights, optimizer,
              scheduler, epoch and step, history, every rank's RNG state. `train` resumes from
              it when it is there: a killed run, started again, continues at the saved step.
    best.pt   the weights of the best epoch so far by `best_metric` (no optimizer state).

Both are fine-tune checkpoints (common/backbones.py documents the format; the extraction job
takes either as --weights). Besides the format's keys they hold: input_size, epoch (last.pt:
the epoch in progress, 1-based; best.pt: the best epoch), step (steps done in that epoch),
global_step, history, identity (what a resumed run must match), config (the job's settings),
train_state, and in last.pt only optimizer, scheduler, scaler, rng and world_size.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset

from common.backbones import FINETUNE_FORMAT, FINETUNE_FORMAT_VERSION, WeightsError, build_classifier, get_spec
from common.distributed import Dist, setup
from common.image_dataset import ImageDataset
from common.inference import autocast, resolve_precision
from common.torch_files import load_versioned
from heads.cli import epoch_line
from heads.losses import make_loss
from heads.metrics import fast_auroc, nanmean

LAST = "last.pt"
BEST = "best.pt"
SCHEDULES = ("plateau", "step")
BEST_METRICS = ("val_loss", "val_auc")


def log(message: str) -> None:
    print(f"[finetune] {message}", file=sys.stderr, flush=True)


@dataclass
class SplitImages:
    """One split's images and their targets, rows aligned."""

    ids: list[str]
    paths: list[str]
    targets: np.ndarray  # (n, K) float32 0/1
    mask: np.ndarray  # (n, K) bool: False where a label is uncertain under U-Ignore

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, input_size: int, train: bool, seed: int = 0) -> ImageDataset:
        return ImageDataset(self.paths, self.targets, self.mask, input_size, train, seed)


@dataclass
class FinetuneConfig:
    out: str
    backbone: str
    label_names: list[str]
    train: SplitImages
    val: SplitImages
    state_file: str | None = None  # starting weights (ImageNet file or checkpoint); None: random
    init_seed: int = 0  # the new classifier, and the whole model without state_file
    input_size: int = 224
    freeze_backbone: bool = False
    loss: str = "weighted_bce"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 16  # per process
    epochs: int = 20
    schedule: str = "plateau"  # 'plateau': ReduceLROnPlateau on val loss; 'step': x lr_factor every step_epochs
    step_epochs: int = 10
    lr_factor: float = 0.1
    plateau_patience: int = 1
    early_stop_patience: int = 3  # epochs without a better best_metric; <= 0 never stops early
    best_metric: str = "val_loss"
    seed: int = 0  # batch order and augmentation
    precision: str = "auto"
    device: str = "cpu"  # 'cpu' | 'cuda'
    num_workers: int = 2  # DataLoader worker processes per training process
    threads: int | None = None  # torch threads per process; default cores / processes on the node
    checkpoint_every: int = 500  # steps; last.pt is also written at every epoch end
    log_every: int = 50  # steps between progress lines within an epoch; 0: none
    stop_after_steps: int | None = None  # stop (after writing last.pt) once this call has run this many
    identity: dict = field(default_factory=dict)  # what a resumed run must match (see resume_point)
    record: dict = field(default_factory=dict)  # the job's settings, stored in the checkpoints


class FinetuneError(ValueError):
    """A run that cannot start or resume; the message is one line."""


class EpochSampler(Sampler[int]):
    """This rank's share of epoch `epoch`'s seeded permutation, from step `start_step` on.

    As DistributedSampler: the permutation depends on (seed, epoch) only and is padded, by
    repeating its start, to a multiple of the world size, so that every rank runs the same number
    of steps (DDP needs that); rank r takes positions r, r + W, r + 2W, ...
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        if n < 1:
            raise ValueError("no images to sample from")
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.epoch, self.start_step = 1, 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        order = np.resize(order, self.per_rank * self.world)  # wraps round: the padding
        return order[self.rank::self.world][self.start_step * self.batch_size:]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start_step * self.batch_size)


@dataclass
class TrainState:
    """Where training is; saved in last.pt and restored on resume."""

    epoch: int = 1  # the epoch in progress, 1-based
    step: int = 0  # steps done in it
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch so far, summed over ranks at each checkpoint
    loss_count: float = 0.0
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_value: float = math.inf  # best_metric as a loss: val_loss, or -val_auc
    best_val_loss: float = math.nan
    best_val_auc: float = math.nan
    bad_epochs: int = 0
    stopped: str | None = None  # set once training is over: 'epochs' | 'early_stop' | 'diverged'
    seconds: float = 0.0  # training time over all runs
    unreadable: list = field(default_factory=list)  # paths that failed to decode


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def state_sha256(state: dict) -> str:
    """Digest of a state dict (every parameter and buffer), to check that data-parallel replicas agree."""
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint(model: torch.nn.Module, cfg: FinetuneConfig, state: TrainState, epoch: int, **extra) -> dict:
    """A fine-tune checkpoint of `model` (unwrapped: no 'module.' prefix), loadable with weights_only."""
    return {
        "format": FINETUNE_FORMAT,
        "format_version": FINETUNE_FORMAT_VERSION,
        "backbone": cfg.backbone,
        "model_state": _cpu_state(model),
        "label_names": list(cfg.label_names),
        "input_size": cfg.input_size,
        "epoch": epoch,
        "step": state.step,
        "global_step": state.global_step,
        "history": list(state.history),
        "identity": dict(cfg.identity),
        "config": dict(cfg.record),
        "train_state": asdict(state),
        **extra,
    }


def read_checkpoint(path: str | Path) -> dict:
    """A fine-tune checkpoint's dict, checked for format; one-line WeightsError otherwise."""
    return load_versioned(path, FINETUNE_FORMAT, FINETUNE_FORMAT_VERSION, WeightsError, "fine-tune checkpoint")


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The fine-tuned model of a checkpoint, with its head, in eval mode on `device`."""
    obj = read_checkpoint(path)
    model = build_classifier(obj["backbone"], None, 0, len(obj["label_names"]))
    model.load_state_dict(obj["model_state"])
    return model.to(device).eval(), obj


def resume_point(out: str | Path, identity: dict) -> dict | None:
    """The saved position of an interrupted run in `out`, after checking it is this run; None if none."""
    path = Path(out) / LAST
    if not path.is_file():
        return None
    obj = read_checkpoint(path)
    saved = obj.get("identity", {})
    differ = [f"{k} ({saved.get(k)!r} then, {identity.get(k)!r} now)" for k in sorted(set(saved) | set(identity))
              if saved.get(k) != identity.get(k)]
    if differ:
        raise FinetuneError(f"--out {out}: holds an interrupted run with other settings: {'; '.join(differ)[:300]}; "
                            "rerun with those, or pass --overwrite to start over")
    return {"epoch": obj["epoch"], "step": obj["step"], "global_step": obj["global_step"]}


def predict(model: torch.nn.Module, dataset, batch_size: int, device: torch.device, precision: str,
            num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, K) float32 and ok flags (n,) of `dataset` in its order, the model in eval mode."""
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
                    logits.append(model(x).float().cpu())
                oks.append(ok)
    finally:
        model.train(was_training)
    if not logits:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        return np.zeros((0, base.targets.shape[1]), np.float32), np.zeros(0, bool)
    return torch.cat(logits).numpy(), torch.cat(oks).numpy().astype(bool)


def _set_train_mode(net: torch.nn.Module, model: torch.nn.Module, classifier: str, frozen: bool) -> None:
    net.train()
    if frozen:
        # A frozen backbone runs as the extractor does: eval-mode BatchNorm, statistics untouched.
        model.eval()
        model.get_submodule(classifier).train()


def _make_scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs, gamma=cfg.lr_factor)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                          patience=cfg.plateau_patience)
    raise FinetuneError(f"--schedule {cfg.schedule!r}: choose from {', '.join(SCHEDULES)}")


def _validate(model, val: ImageDataset, loss_fn, cfg: FinetuneConfig, d: Dist, precision: str):
    """Val loss and mean AUROC of the whole split: each rank predicts every W-th image, rank 0
    scores them all and broadcasts, so every rank takes the same decisions from the same numbers."""
    idx = np.arange(d.rank, len(val), d.world)
    logits, ok = predict(model, Subset(val, idx.tolist()), cfg.batch_size, d.device, precision, cfg.num_workers)
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
        values = (loss, nanmean(fast_auroc(y, logits, mask)), [val.paths[i] for i in np.flatnonzero(~ok)])
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
    say = log if d.main else (lambda _m: None)
    out = Path(cfg.out)
    spec = get_spec(cfg.backbone)
    precision = resolve_precision(cfg.precision, d.device.type)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels

    model = build_classifier(cfg.backbone, cfg.state_file, cfg.init_seed, len(cfg.label_names))
    if cfg.freeze_backbone:
        model.requires_grad_(False)
        model.get_submodule(spec.classifier).requires_grad_(True)
    # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
    model = model.to(d.device, memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True)
    scheduler = _make_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
    loss_fn, loss_notes = make_loss(cfg.loss, torch.from_numpy(cfg.train.targets),
                                    torch.from_numpy(cfg.train.mask.astype(np.float32)), cfg.focal_gamma,
                                    cfg.focal_alpha, cfg.label_names)

    state, resumed = TrainState(), None
    if (out / LAST).is_file():
        obj = read_checkpoint(out / LAST)
        if obj.get("world_size") != d.world:
            raise FinetuneError(f"{out / LAST}: written by {obj.get('world_size')} processes, this run has {d.world}")
        model.load_state_dict(obj["model_state"])
        opt.load_state_dict(obj["optimizer"])
        scheduler.load_state_dict(obj["scheduler"])
        scaler.load_state_dict(obj["scaler"])
        state = TrainState(**obj["train_state"])
        rng = obj["rng"][d.rank]
        torch.set_rng_state(rng["cpu"])
        if d.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        if not d.main:  # rank 0 carries the epoch's loss so far; the epoch-end sum adds the rest
            state.loss_sum = state.loss_count = 0.0
        if state.stopped == "epochs" and state.epoch <= cfg.epochs:
            state.stopped = None  # more epochs asked for than the saved run had
        resumed = {"epoch": state.epoch, "step": state.step, "global_step": state.global_step}
        say(f"resuming from {out / LAST}: epoch {state.epoch}, step {state.step} (global step {state.global_step})")
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout masks: a stream per rank

    net = model
    if d.on:
        net = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    train_ds = cfg.train.dataset(cfg.input_size, train=True, seed=cfg.seed)
    val_ds = cfg.val.dataset(cfg.input_size, train=False)
    sampler = EpochSampler(len(train_ds), cfg.batch_size, d.world, d.rank, cfg.seed)
    steps = sampler.steps_per_epoch
    unreadable = set(state.unreadable)
    say(f"{len(train_ds)} train / {len(val_ds)} val images; {d.world} process(es) on {d.device.type}, "
        f"batch {cfg.batch_size} per process, {steps} steps per epoch; {precision}; "
        f"{sum(p.numel() for p in trainable):,} trainable parameters"
        + (" (classifier only)" if cfg.freeze_backbone else ""))

    def save_last() -> None:
        # Collectives on every rank (all reach the same step); the write on rank 0 only.
        totals = d.sum(state.loss_sum, state.loss_count)
        rngs = d.all_gather({"cpu": torch.get_rng_state(),
                             **({"cuda": torch.cuda.get_rng_state()} if d.device.type == "cuda" else {})})
        names = sorted(set().union(*d.all_gather(sorted(unreadable))))
        if d.main:
            saved = TrainState(**{**asdict(state), "loss_sum": totals[0], "loss_count": totals[1], "unreadable": names})
            save_atomic(checkpoint(model, cfg, saved, saved.epoch, optimizer=opt.state_dict(),
                                   scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                                   world_size=d.world), out / LAST)

    run_steps, interrupted, started = 0, False, time.perf_counter()
    while state.stopped is None and state.epoch <= cfg.epochs and not interrupted:
        t0 = time.perf_counter()
        train_ds.epoch = state.epoch
        sampler.set_epoch(state.epoch, state.step)
        _set_train_mode(net, model, spec.classifier, cfg.freeze_backbone)
        # Its own generator: the loader's worker seeds then leave the global RNG (dropout) alone,
        # so a resumed epoch draws the same dropout masks as an uninterrupted one.
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=d.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + state.epoch))
        done, seen, seen_loss = 0, 0, 0.0
        for x, y, mask, ok, idx in loader:
            if not ok.all():
                unreadable.update(train_ds.paths[i] for i in idx[~ok].tolist())
            x = x.to(d.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(d.device, non_blocking=True)
            mask = (mask * ok[:, None]).to(d.device, non_blocking=True)  # unreadable images add no loss
            with autocast(d.device.type, precision):
                logits = net(x)
            loss = loss_fn(logits.float(), y, mask)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n_ok = int(ok.sum())
            value = loss.item()
            state.loss_sum += value * n_ok
            state.loss_count += n_ok
            done += 1
            seen += len(ok)
            seen_loss += value * n_ok
            state.step += 1
            state.global_step += 1
            run_steps += 1
            if cfg.log_every and state.step % cfg.log_every == 0 and state.step < steps:
                say(_progress(state, cfg, steps, done, seen * d.world, time.perf_counter() - t0,
                              seen_loss / max(seen, 1)))
            if cfg.stop_after_steps and run_steps >= cfg.stop_after_steps:
                interrupted = True
                break
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and state.step < steps:
                save_last()
        if interrupted:
            state.seconds += time.perf_counter() - t0
            save_last()
            say(f"stopping after {run_steps} steps as asked: epoch {state.epoch}, step {state.step} saved in "
                f"{out / LAST}; run the same command again to resume")
            break

        total, count = d.sum(state.loss_sum, state.loss_count)
        d.sync_buffers(model)
        val_loss, val_auc, val_bad = _validate(model, val_ds, loss_fn, cfg, d, precision)
        unreadable.update(val_bad)
        row = {"epoch": state.epoch, "train_loss": total / count if count else math.nan, "val_loss": val_loss,
               "val_auc": val_auc, "lr": opt.param_groups[0]["lr"]}
        if cfg.schedule == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        row["seconds"] = time.perf_counter() - t0  # validation included
        state.seconds += row["seconds"]
        state.history.append(row)
        mark = ""
        if not (math.isfinite(row["train_loss"]) and math.isfinite(val_loss)):
            state.stopped = "diverged"
            mark = "  diverged (non-finite loss); keeping the best epoch so far"
        else:
            value = val_loss if cfg.best_metric == "val_loss" else -val_auc
            value = value if math.isfinite(value) else math.inf
            if state.best_epoch == 0 or value < state.best_value:
                state.best_epoch, state.best_value = state.epoch, value
                state.best_val_loss, state.best_val_auc = val_loss, val_auc
                state.bad_epochs = 0
                mark = "  *"
                if d.main:
                    save_atomic(checkpoint(model, cfg, state, state.epoch), out / BEST)
            else:
                state.bad_epochs += 1
        say(epoch_line(row, cfg.epochs, mark))
        if state.stopped is None and 0 < cfg.early_stop_patience <= state.bad_epochs:
            state.stopped = "early_stop"
            say(f"early stop: {cfg.best_metric} has not improved for {state.bad_epochs} epochs; "
                f"best epoch {state.best_epoch}")
        state.epoch, state.step, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0.0
        if state.stopped is None and state.epoch > cfg.epochs:
            state.stopped = "epochs"
        save_last()

    digests = d.all_gather(state_sha256(model.state_dict()))
    result = {
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "best_val_auc": state.best_val_auc,
        "stopped": "interrupted" if interrupted else (state.stopped or "epochs"),
        "epoch": state.epoch,
        "step": state.step,
        "global_step": state.global_step,
        "steps_per_epoch": steps,
        "steps_this_run": run_steps,
        "resumed_from": resumed,
        "train_seconds": round(state.seconds, 2),
        "seconds_this_run": round(time.perf_counter() - started, 2),
        "unreadable": sorted(set().union(*d.all_gather(sorted(unreadable)))),
        "loss_notes": loss_notes,
        "rank_state_sha256": digests,
        "world_size": d.world,
        "device": d.device.type,
        "precision": precision,
    }
    return d.broadcast(result)
