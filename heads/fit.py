"""The training loop: whole-split tensors indexed by a seeded permutation, Adam,
ReduceLROnPlateau and early stopping on validation loss, best checkpoint kept.

No DataLoader: one epoch is a randperm and `index_select` batches out of one contiguous tensor,
which on a 2-core CPU is several times faster than per-sample fetching and collation.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from common.models import inference
from common.config import epoch_line, log as log_stderr
from common.training.early_stopping import early_stop_line, judge_epoch
from common.training.losses import LossFn
from common.evaluation.metrics import fast_auroc, nanmean
from heads.choices import PRECISIONS
from heads.models import HeadSpec, build_head


def resolve_precision(name: str) -> str:
    """'auto' -> 'bf16' on a CPU with native bf16, else 'fp32' (heads train on the CPU)."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: choose from {', '.join(PRECISIONS)}")
    return inference.resolve_precision(name, "cpu")


def input_tensor(x: np.ndarray, precision: str) -> torch.Tensor:
    """The tensor the loop indexes. Under bf16 the first matmul casts its input to bf16 anyway,
    so holding it as bf16 gives the same results at half the memory and gather traffic."""
    t = torch.from_numpy(x)
    return t.to(torch.bfloat16) if precision == "bf16" else t


@dataclass
class Tensors:
    x: torch.Tensor  # (n, width) fp32 or bf16
    y: torch.Tensor  # (n, labels) fp32 0/1
    mask: torch.Tensor  # (n, labels) fp32 0/1

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class FitConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 512
    epochs: int = 50
    plateau_patience: int = 1
    plateau_factor: float = 0.2
    early_stop_patience: int = 5  # epochs without a better val loss; <= 0 never stops early
    seed: int = 0
    precision: str = "fp32"  # resolved: 'fp32' | 'bf16'


@dataclass
class FitResult:
    state_dict: dict
    best_epoch: int
    best_val_loss: float
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "epochs"  # 'epochs' | 'early_stop' | 'diverged'


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, precision: str, chunk: int = 16384,
                   forward=None) -> torch.Tensor:
    model.eval()
    forward = forward or model
    with inference.autocast("cpu", precision):
        out = [forward(x[s:s + chunk]).float() for s in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def loss_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the loss takes: the logits, or a U-MultiClass head's (N, K, 3) three-way logits."""
    return model.three_way(x) if hasattr(model, "three_way") else model(x)


def _val_auc(y: np.ndarray, mask: np.ndarray, logits: torch.Tensor) -> float:
    return nanmean(fast_auroc(y, logits.numpy(), mask))


def fit(spec: HeadSpec, train: Tensors, val: Tensors, loss_fn: LossFn, cfg: FitConfig,
        log: Callable[[str], None] | None = None,
        val_truth: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.nn.Module, FitResult]:
    """Train a head from seed `cfg.seed`; returns it with the best (lowest val loss) weights loaded.

    The val loss (early stopping) uses `val`'s policy targets; the val AUROC uses `val_truth`, the
    raw (y, mask) of common.data.targets.eval_targets, when given, so it does not move with the policy."""
    truth = val_truth if val_truth is not None else (val.y.numpy(), val.mask.numpy().astype(bool))
    log = log if log is not None else log_stderr
    # Adam's moment estimates (squares of tiny gradients) fall into denormal floats, which x86
    # handles very slowly: measured here, an NIH-size epoch went from ~1 s to 10-30 s without this.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)  # weight init and dropout
    model = build_head(spec)
    # fused: one kernel per step instead of ~10 small ops per parameter (a tenth of an epoch here).
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                           fused=True)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.plateau_factor,
                                                         patience=cfg.plateau_patience)
    order = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(train), cfg.batch_size
    result = FitResult(copy.deepcopy(model.state_dict()), 0, math.inf, float("nan"))
    bad_epochs, started = 0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=order)
        total = torch.zeros((), dtype=torch.float64)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            with inference.autocast("cpu", cfg.precision):  # weights, Adam, loss stay fp32
                logits = loss_outputs(model, train.x.index_select(0, idx))
            loss = loss_fn(logits.float(), train.y.index_select(0, idx), train.mask.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        val_logits = predict_logits(model, val.x, cfg.precision)
        with torch.no_grad():
            val_out = val_logits if not hasattr(model, "three_way") else \
                predict_logits(model, val.x, cfg.precision, forward=model.three_way)
            val_loss = float(loss_fn(val_out, val.y, val.mask))
        row = {"epoch": epoch, "train_loss": float(total) / n, "val_loss": val_loss,
               "val_auc": _val_auc(*truth, val_logits), "lr": opt.param_groups[0]["lr"]}
        plateau.step(val_loss)
        row["seconds"] = time.perf_counter() - t0
        result.history.append(row)
        verdict = judge_epoch(row["train_loss"], val_loss, val_loss, result.best_val_loss, result.best_epoch,
                              bad_epochs, cfg.early_stop_patience)
        if verdict.improved:
            result.state_dict = copy.deepcopy(model.state_dict())
            result.best_epoch, result.best_val_loss, result.best_val_auc = epoch, val_loss, row["val_auc"]
        bad_epochs = verdict.bad_epochs
        log(epoch_line(row, cfg.epochs, verdict.mark))
        if verdict.stopped:
            result.stopped = verdict.stopped
            if verdict.stopped == "early_stop":
                log(early_stop_line("val loss", bad_epochs, result.best_epoch))
            break
    result.seconds = time.perf_counter() - started
    model.load_state_dict(result.state_dict)
    model.eval()
    return model, result
