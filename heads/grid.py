"""The grid of head fits a run trains (one cell without a grid) under its policy's loss: heads/run.py
fits it once, heads/selftrain.py once more per self-training round."""

from __future__ import annotations

import itertools
import math

import torch

from common.config import log
from common.training.losses import make_loss, multiclass_ce
from heads.fit import FitConfig, fit
from heads.models import HeadEnsemble, HeadSpec
from heads.settings import HeadSettings


def policy_loss(settings: HeadSettings, y: torch.Tensor, mask: torch.Tensor, label_names: list[str]):
    """The run's loss and its notes: --loss (class weights fitted on these targets), or for U-MultiClass
    the 3-way cross-entropy of the paper (--loss does not apply to a softmax over three classes)."""
    if settings.policy == "multiclass":
        return multiclass_ce, ["U-MultiClass: a 3-way softmax per observation trained with cross-entropy; --loss "
                               "not used; the positive probability is renormalized over {negative, positive}"]
    return make_loss(settings.loss, y, mask, settings.focal_gamma, settings.focal_alpha, label_names)


def _score(cell: dict, metric: str) -> float:
    """Larger is better; a NaN cell never wins."""
    value = cell["val_auc"] if metric == "val_auc" else -cell["val_loss"]
    return value if value is not None and math.isfinite(value) else -math.inf


def train_grid(s: HeadSettings, data, spec: HeadSpec, loss_fn, precision: str):
    """Fit every lr x weight-decay cell of `data` (heads.run.Prepared); keep the best by the grid metric."""
    lrs, wds = s.grid_lr or (s.lr,), s.grid_weight_decay or (s.weight_decay,)
    cells, fits = [], []
    quiet = (lambda line: None) if s.quiet else log
    for i, (lr, wd) in enumerate(itertools.product(lrs, wds), 1):
        if len(lrs) * len(wds) > 1:
            log(f"grid cell {i}/{len(lrs) * len(wds)}: lr {lr:g}, weight decay {wd:g}")
        cfg = FitConfig(lr=lr, weight_decay=wd, betas=s.betas, batch_size=s.batch_size, epochs=s.epochs,
                        plateau_patience=s.plateau_patience, plateau_factor=s.plateau_factor,
                        early_stop_patience=s.early_stop_patience, seed=s.init_seed, precision=precision)
        model, result = fit(spec, data.tensors["train"], data.tensors["val"], loss_fn, cfg, log=quiet,
                            val_truth=data.truth["val"])
        cell = {"lr": lr, "weight_decay": wd, "best_epoch": result.best_epoch, "val_loss": result.best_val_loss,
                "val_auc": result.best_val_auc, "epochs_run": len(result.history), "stopped": result.stopped,
                "seconds": round(result.seconds, 2)}
        cells.append(cell)
        fits.append((cell, model, result))
    # Best first; a stable sort keeps the grid's order among equal cells.
    fits.sort(key=lambda f: -_score(f[0], s.grid_metric))
    keep = s.grid_ensemble
    if keep > 1:  # the top cells answer as one head: the mean of their probabilities
        cell, _, result = fits[0]
        for rank, (c, _, _) in enumerate(fits[:keep], 1):
            c["ensemble_rank"] = rank
        return cells, (cell, HeadEnsemble([m for _, m, _ in fits[:keep]]), result)
    return cells, fits[0]
