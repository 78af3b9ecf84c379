"""The epoch-end decisions every trainer shares (heads/fit.py, finetune/loop.py): a non-finite loss stops the
run (diverged, the best epoch so far kept), the best epoch is the lowest `value` (val loss, or -val AUROC), and
the run stops early after `patience` epochs without a better one (patience <= 0: never)."""

from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGED_MARK = "  diverged (non-finite loss); keeping the best epoch so far"
IMPROVED_MARK = "  *"


@dataclass(frozen=True)
class Verdict:
    improved: bool  # this epoch is the new best: keep its weights
    bad_epochs: int  # epochs in a row without a better value
    stopped: str | None  # 'diverged' | 'early_stop' | None

    @property
    def mark(self) -> str:
        """What the epoch's progress line ends with."""
        return DIVERGED_MARK if self.stopped == "diverged" else IMPROVED_MARK if self.improved else ""


def selection_value(best_metric: str, val_loss: float, val_auc: float) -> float:
    """What judge_epoch minimises for --best-metric: val loss, or val AUROC negated."""
    return val_loss if best_metric == "val_loss" else -val_auc


def judge_epoch(train_loss: float, val_loss: float, value: float, best_value: float, best_epoch: int,
                bad_epochs: int, patience: int) -> Verdict:
    """The verdict on a finished epoch whose selection `value` (lower is better; NaN counts as the worst) is
    compared with the best so far (`best_epoch` 0: none yet)."""
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        return Verdict(False, bad_epochs, "diverged")
    value = value if math.isfinite(value) else math.inf
    if best_epoch == 0 or value < best_value:
        return Verdict(True, 0, None)
    bad = bad_epochs + 1
    return Verdict(False, bad, "early_stop" if 0 < patience <= bad else None)


def early_stop_line(metric: str, bad_epochs: int, best_epoch: int) -> str:
    return f"early stop: {metric} has not improved for {bad_epochs} epochs; best epoch {best_epoch}"
