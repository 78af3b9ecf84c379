"""Labels -> what a model trains on and what it is scored on.

A run picks a subset of a dataset's labels; its loss follows the uncertain-label policy
(U-Ignore, U-Zeros, U-Ones: Irvin et al. 2019), while every metric, threshold and saved
prediction uses the raw labels, uncertain entries left out of that class's metric, whatever
the policy (`eval_targets`). Shared by heads.train and the fine-tuning job.
"""

from __future__ import annotations

import numpy as np

from common.data.labels import CHEXPERT_COMPETITION, NIH_NO_FINDING, POSITIVE, UNCERTAIN

# Columns that are not a disease: they count neither as "another disease" (D-AUC) nor against
# "No Finding" (N-AUC).
NOT_DISEASES = (NIH_NO_FINDING, "Support Devices")

POLICIES = ("ignore", "zeros", "ones")  # U-Ignore, U-Zeros, U-Ones (Irvin et al. 2019)
# The heads also have the paper's other two: U-MultiClass (a 3-way softmax per observation) and
# U-SelfTrained (U-Ignore, then uncertain labels replaced by the model's own probabilities, retrained).
HEAD_POLICIES = POLICIES + ("multiclass", "selftrained")
# U-MultiClass trains on images too; U-SelfTrained (several whole fits) stays a head policy.
FINETUNE_POLICIES = POLICIES + ("multiclass",)
MULTICLASS_NEGATIVE, MULTICLASS_UNCERTAIN, MULTICLASS_POSITIVE = 0, 1, 2


class LabelError(ValueError):
    """A label choice that does not fit the data; the message is one line."""



def select_labels(label_names: tuple[str, ...], choice="all", drop_no_finding: bool = True) -> list[str]:
    """The label subset a head predicts: 'all', 'competition' (CheXpert's five) or a list of names."""
    if choice == "all":
        chosen = list(label_names)
    elif choice == "competition":
        chosen = list(CHEXPERT_COMPETITION)
    else:
        chosen = [c.strip() for c in choice.split(",")] if isinstance(choice, str) else list(choice)
    missing = [c for c in chosen if c not in label_names]
    if missing:
        raise LabelError(f"--labels: {missing[0]!r} is not a label of this store ({', '.join(label_names)})")
    if drop_no_finding:
        chosen = [c for c in chosen if c != NIH_NO_FINDING]
    if not chosen:
        raise LabelError("--labels: no labels left to train on")
    return chosen


def label_columns(label_names: tuple[str, ...], chosen: list[str]) -> np.ndarray:
    return np.array([label_names.index(c) for c in chosen], dtype=np.intp)


def apply_policy(labels: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Uncertain (-1) labels -> (targets float32, mask bool): U-Ignore masks them out of loss
    and metrics, U-Zeros reads them as negative, U-Ones as positive; U-MultiClass gives each entry
    its class (0 negative, 1 uncertain, 2 positive); U-SelfTrained starts as U-Ignore."""
    if policy not in HEAD_POLICIES:
        raise ValueError(f"--policy {policy!r}: choose from {', '.join(HEAD_POLICIES)}")
    uncertain = labels == UNCERTAIN
    if policy == "multiclass":  # targets are class indices: 0 negative, 1 uncertain, 2 positive
        classes = np.where(uncertain, MULTICLASS_UNCERTAIN, np.where(labels == POSITIVE, MULTICLASS_POSITIVE,
                                                                      MULTICLASS_NEGATIVE))
        return classes.astype(np.float32), np.ones(labels.shape, dtype=bool)
    if policy in ("ignore", "selftrained"):  # self-training starts from U-Ignore (heads/selftrain.py)
        return (labels == POSITIVE).astype(np.float32), ~uncertain
    targets = (labels == POSITIVE) | (uncertain if policy == "ones" else False)
    return targets.astype(np.float32), np.ones(labels.shape, dtype=bool)


def eval_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth every metric, threshold and saved prediction uses: positives as 1, uncertain
    entries masked out of their class, for any training policy (a policy shapes the loss only)."""
    return apply_policy(labels, "ignore")


def finding_flags(labels: np.ndarray, label_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, over all the store's disease labels (not only the trained subset):
    has_disease = at least one positive; no_finding = every disease label negative (0).
    These define the negatives of D-AUC and N-AUC (Ge et al. 2018)."""
    cols = [i for i, n in enumerate(label_names) if n not in NOT_DISEASES]
    disease = labels[:, cols]
    return (disease == POSITIVE).any(axis=1), (disease == 0).all(axis=1)
