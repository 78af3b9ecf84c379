"""common/training/early_stopping.py: the epoch-end verdict heads and fine-tuning share."""

import math

from common.training.early_stopping import judge_epoch


def test_divergence_best_epoch_and_patience():
    inf, nan = math.inf, math.nan
    first = judge_epoch(0.7, 0.6, nan, inf, 0, 0, patience=2)  # no best yet: the first epoch is, even with NaN AUROC
    assert (first.improved, first.bad_epochs, first.stopped, first.mark) == (True, 0, None, "  *")
    worse = judge_epoch(0.6, 0.65, 0.65, 0.6, 1, 0, patience=2)
    assert (worse.improved, worse.bad_epochs, worse.stopped, worse.mark) == (False, 1, None, "")
    assert judge_epoch(0.6, 0.65, 0.65, 0.6, 1, 1, patience=2).stopped == "early_stop"
    assert judge_epoch(0.6, 0.65, 0.65, 0.6, 1, 9, patience=0).stopped is None  # patience 0: never early
    assert judge_epoch(0.6, 0.65, nan, 0.6, 1, 0, patience=5).improved is False  # NaN is the worst value
    better = judge_epoch(0.5, 0.55, 0.55, 0.6, 1, 1, patience=2)
    assert (better.improved, better.bad_epochs) == (True, 0)
    diverged = judge_epoch(inf, 0.5, 0.5, 0.6, 1, 1, patience=2)
    assert (diverged.improved, diverged.bad_epochs, diverged.stopped) == (False, 1, "diverged")
    assert diverged.mark.startswith("  diverged") and judge_epoch(0.5, nan, 0.1, 0.6, 1, 0, 2).stopped == "diverged"


def test_a_flat_val_loss_does_not_choose_the_epoch_under_val_auc():
    """Shenzhen from scratch: val loss ~ln 2 every epoch (the smallest drift picked epoch 2) while val AUROC
    climbed; by val AUROC the epoch that ranks best is chosen."""
    from common.training.early_stopping import selection_value

    history = [(0.6893, 0.51), (0.6890, 0.58), (0.6891, 0.66), (0.6892, 0.74)]

    def best(metric):
        best_value, best_epoch, bad = math.inf, 0, 0
        for epoch, (loss, auc) in enumerate(history, 1):
            verdict = judge_epoch(0.6, loss, selection_value(metric, loss, auc), best_value, best_epoch, bad, 5)
            bad = verdict.bad_epochs
            if verdict.improved:
                best_value, best_epoch = selection_value(metric, loss, auc), epoch
        return best_epoch

    assert best("val_loss") == 2 and best("val_auc") == 4
