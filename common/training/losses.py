"""Multi-label losses on logits, all mask-aware: an entry with mask 0 (an uncertain label under
U-Ignore) contributes neither loss nor gradient, and counts in no normalizer.

Every loss has the signature (logits, targets, mask) -> scalar, with (batch, labels) float
tensors; targets are 0/1 and mask is 0/1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("bce", "weighted_bce", "wcel", "focal", "msml")
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Stands in for -inf where a softmax must ignore an entry: finite, so a row with nothing left
# gives 0 loss and 0 gradient instead of NaN.
_NEG_BIG = -1e30


def loss_text(s: dict) -> str:
    """The loss a run's settings `s` trained with, as reports and logs name it: U-MultiClass's 3-way
    cross-entropy whatever --loss says, the focal loss with its parameters."""
    if s.get("policy") == "multiclass":
        return "multiclass_ce (U-MultiClass: 3-way cross-entropy; --loss not used)"
    if "focal" not in s["loss"].split("+"):
        return s["loss"]
    alpha = s.get("focal_alpha")
    return f"{s['loss']} (focal γ {s['focal_gamma']:g}, α {'none' if alpha is None else f'{alpha:g}'})"


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def bce(logits, targets, mask, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy averaged over the valid entries; pos_weight (per label) scales positives."""
    if pos_weight is not None:
        pos_weight = pos_weight.to(logits.device)  # fitted on CPU; the logits may be on CUDA
    per = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    return _masked_mean(per, mask)


def multiclass_ce(logits, classes, mask) -> torch.Tensor:
    """U-MultiClass (Irvin et al. 2019): cross-entropy of each observation's 3-way logits (N, K, 3)
    against its class (N, K) in {0 negative, 1 uncertain, 2 positive}, averaged over the valid entries."""
    per = F.cross_entropy(logits.reshape(-1, 3), classes.reshape(-1).long(), reduction="none")
    return _masked_mean(per.view_as(classes), mask)


def pos_weight_from(targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """|negatives| / |positives| per label on train, for weighted BCE. A label with no positive
    (or no negative) gets weight 1; its index is returned so the caller can say so."""
    pos = (targets * mask).sum(0)
    neg = ((1 - targets) * mask).sum(0)
    degenerate = (pos == 0) | (neg == 0)
    weight = torch.where(degenerate, torch.ones_like(pos), neg / pos.clamp(min=1))
    return weight, torch.nonzero(degenerate).flatten().tolist()


def wcel(logits, targets, mask) -> torch.Tensor:
    """Weighted cross-entropy loss of Wang et al. 2017 (ChestX-ray8), weights from this batch:

        L = [β_P Σ_{y=1} -ln σ(x) + β_N Σ_{y=0} -ln(1-σ(x))] / (|P|+|N|),
        β_P = (|P|+|N|)/|P|,  β_N = (|P|+|N|)/|N|,

    |P| and |N| the counts of valid 1s and 0s in the whole batch's label matrix. Dividing by
    |P|+|N| keeps the scale of BCE; it makes L = mean over positives + mean over negatives.
    A batch without positives (or negatives) drops that term.
    """
    pos = targets * mask
    neg = (1 - targets) * mask
    n_pos, n_neg = pos.sum(), neg.sum()
    pos_term = (pos * -F.logsigmoid(logits)).sum() / n_pos.clamp(min=1)
    neg_term = (neg * -F.logsigmoid(-logits)).sum() / n_neg.clamp(min=1)
    return pos_term + neg_term


def focal(logits, targets, mask, gamma: float = 2.0, alpha: float | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): -α_t (1-p_t)^γ ln p_t per entry, mean over valid entries;
    alpha None means no α_t factor."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    per = (1 - p_t) ** gamma * ce
    if alpha is not None:
        per = per * (alpha * targets + (1 - alpha) * (1 - targets))
    return _masked_mean(per, mask)


def msml(logits, targets, mask) -> torch.Tensor:
    """Multi-label softmax loss of Ge et al. 2018: per image, each positive class p is softmaxed
    against all the image's negative classes N,

        ℓ_p = -ln( e^{x_p} / (e^{x_p} + Σ_{n∈N} e^{x_n}) ) = softplus(logsumexp_N(x) - x_p),

    averaged over the image's positives, then over the images that have a positive. Images with
    no positive label (No Finding) contribute nothing: combine with BCE (`bce+msml`) to use them.
    """
    pos = (targets * mask) > 0
    neg = ((1 - targets) * mask) > 0
    neg_lse = torch.logsumexp(torch.where(neg, logits, torch.full_like(logits, _NEG_BIG)), dim=1, keepdim=True)
    per = F.softplus(neg_lse - logits) * pos
    n_pos = pos.sum(1)
    has = n_pos > 0
    per_image = per.sum(1)[has] / n_pos[has]
    return per_image.mean() if per_image.numel() else logits.sum() * 0.0


def make_loss(name: str, train_targets: torch.Tensor, train_mask: torch.Tensor, focal_gamma: float = 2.0,
              focal_alpha: float | None = None, label_names: list[str] | None = None) -> tuple[LossFn, list[str]]:
    """The loss called `name` ('bce+msml' sums two), with class weights fitted on train.
    Returns the function and notes for the report (e.g. a label whose weight fell back to 1)."""
    parts, notes = [], []
    for part in name.split("+"):
        part = part.strip()
        if part == "bce":
            parts.append(bce)
        elif part == "weighted_bce":
            weight, bad = pos_weight_from(train_targets, train_mask)
            for i in bad:
                label = label_names[i] if label_names else str(i)
                notes.append(f"weighted_bce: {label} has no positive or no negative on train; pos_weight 1")
            parts.append(lambda x, y, m, w=weight: bce(x, y, m, pos_weight=w))
        elif part == "wcel":
            parts.append(wcel)
        elif part == "focal":
            parts.append(lambda x, y, m: focal(x, y, m, gamma=focal_gamma, alpha=focal_alpha))
        elif part == "msml":
            parts.append(msml)
        else:
            raise ValueError(f"--loss {name!r}: {part!r} is not one of {', '.join(LOSSES)} (join two with '+')")
    if len(parts) == 1:
        return parts[0], notes
    return (lambda x, y, m: sum(f(x, y, m) for f in parts)), notes
