"""U-SelfTrained (Irvin et al. 2019): fit with U-Ignore, replace the uncertain training labels by the
model's own predictions, refit, and repeat until the relabelled targets stop changing.

The relabels are the model's probabilities (soft targets in [0, 1]), not thresholded 0/1: a
probability keeps the model's doubt, where a threshold would turn every near-0.5 guess into a
confident label. Each round refits from the same initial seed on the new targets (their class
weights refitted too); the val loss and AUROC stay on the raw labels. Every round is recorded.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.config import log
from heads.fit import Tensors, predict_logits
from heads.grid import policy_loss, train_grid
from heads.settings import HeadSettings


def self_train(settings: HeadSettings, data, spec, model, precision: str, cells: list, best: tuple):
    """Rounds of relabel-and-refit after the U-Ignore fit `best` = (cell, model, result).
    Returns the last round's (cells, best) and one record per round."""
    train = data.tensors["train"]
    raw_y, raw_mask = data.truth["train"]
    uncertain = torch.from_numpy(~raw_mask)  # eval_targets masks exactly the uncertain entries
    base = torch.from_numpy(raw_y.astype(np.float32))
    n_uncertain = int(uncertain.sum())
    rounds, previous = [], None
    if n_uncertain == 0:
        log("self-training: no uncertain training label; the U-Ignore fit stands")
        return cells, best, [{"round": 0, "uncertain": 0, "stopped": "no uncertain labels"}]
    for r in range(1, settings.self_train_rounds + 1):
        probs = torch.sigmoid(predict_logits(model, train.x, precision))
        relabel = probs[uncertain]
        change = math.inf if previous is None else float((relabel - previous).abs().max())
        record = {"round": r, "uncertain": n_uncertain, "max_change": None if math.isinf(change) else change,
                  "relabelled_mean": float(relabel.mean()),
                  "relabelled_positive_share": float((relabel >= 0.5).float().mean()),
                  "per_class_mean": {name: float(probs[:, j][uncertain[:, j]].mean()) if uncertain[:, j].any() else None
                                     for j, name in enumerate(data.label_names)}}
        if change <= settings.self_train_tol:
            record["stopped"] = "converged"
            rounds.append(record)
            log(f"self-training round {r}: the relabelled targets moved at most {change:.4f}: converged")
            break
        targets = torch.where(uncertain, probs, base)
        data.tensors["train"] = Tensors(train.x, targets, torch.ones_like(targets))
        loss_fn, _ = policy_loss(settings, targets, torch.ones_like(targets), data.label_names)
        cells, best = train_grid(settings, data, spec, loss_fn, precision)
        model = best[1]
        record.update({"val_loss": best[2].best_val_loss, "val_auc": best[2].best_val_auc,
                       "best_epoch": best[2].best_epoch})
        rounds.append(record)
        log(f"self-training round {r}: {n_uncertain} uncertain labels relabelled (mean {record['relabelled_mean']:.3f}, "
            f"max change {change:.4f}); refit val_auc {best[2].best_val_auc:.4f}")
        previous = relabel
    else:
        rounds[-1]["stopped"] = "max rounds"
    data.tensors["train"] = train  # the store's own targets again, for anything that reads them after
    return cells, best, rounds
