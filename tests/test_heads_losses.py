"""Losses against values computed by hand from their formulas, and their masking."""

import math

import pytest
import torch

from common.training.losses import bce, focal, make_loss, msml, pos_weight_from, wcel


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def softplus(v):  # -ln(1 - sigmoid(v)) = ln(1 + e^v); -ln sigmoid(v) = softplus(-v)
    return math.log1p(math.exp(v))


def test_bce_averages_valid_entries_only():
    x, y, m = t([[0.0, 2.0], [-1.0, 0.5]]), t([[1, 0], [0, 1]]), t([[1, 1], [1, 0]])
    expected = (math.log(2) + softplus(2.0) + softplus(-1.0)) / 3
    assert bce(x, y, m).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_weight_is_negatives_over_positives_with_fallback():
    y = t([[1, 0], [0, 0], [0, 0], [0, 0]])
    w, degenerate = pos_weight_from(y, torch.ones_like(y))
    assert w.tolist() == [3.0, 1.0] and degenerate == [1]
    fn, notes = make_loss("weighted_bce", y, torch.ones_like(y), label_names=["A", "B"])
    assert len(notes) == 1 and "B" in notes[0]
    x = t([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    per_entry = [3 * softplus(-0.5), math.log(2)] + [math.log(2)] * 6  # positives scaled by 3
    assert fn(x, y, torch.ones_like(y)).item() == pytest.approx(sum(per_entry) / 8, rel=1e-6)


def test_wcel_matches_wang_formula_with_batch_betas():
    x = t([[0.0, 1.0], [2.0, -1.0], [0.5, 0.3]])
    y = t([[1, 0], [0, 0], [0, 0]])
    # |P| = 1, |N| = 5 over the whole batch: beta_P = 6/1, beta_N = 6/5.
    beta_p, beta_n = 6 / 1, 6 / 5
    pos = softplus(-0.0)
    neg = softplus(1.0) + softplus(2.0) + softplus(-1.0) + softplus(0.5) + softplus(0.3)
    expected = (beta_p * pos + beta_n * neg) / 6
    assert wcel(x, y, torch.ones_like(y)).item() == pytest.approx(expected, rel=1e-6)


def test_wcel_masked_entry_has_no_loss_and_no_gradient():
    x = t([[0.0, 30.0], [2.0, -1.0]]).requires_grad_()
    y, m = t([[1, 1], [0, 1]]), t([[1, 0], [1, 1]])
    loss = wcel(x, y, m)
    loss.backward()
    # Valid: P = {0.0, -1.0}, N = {2.0}; the masked 30.0 is in neither.
    expected = (softplus(-0.0) + softplus(1.0)) / 2 + softplus(2.0) / 1
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert x.grad[0, 1].item() == 0.0


def test_focal_hand_values_and_gamma_zero_is_bce():
    x, y, m = t([[0.0, 1.0]]), t([[1, 0]]), t([[1, 1]])
    p1 = 1 / (1 + math.exp(-1.0))
    expected = ((0.5**2) * math.log(2) + (p1**2) * softplus(1.0)) / 2
    assert focal(x, y, m, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    with_alpha = ((0.25 * 0.5**2) * math.log(2) + (0.75 * p1**2) * softplus(1.0)) / 2
    assert focal(x, y, m, gamma=2.0, alpha=0.25).item() == pytest.approx(with_alpha, rel=1e-6)
    assert focal(x, y, m, gamma=0.0).item() == pytest.approx(bce(x, y, m).item(), rel=1e-6)


def test_msml_softmaxes_each_positive_against_the_negatives():
    x = t([[1.0, 2.0, 0.0], [0.3, 0.1, 0.2], [0.5, 3.0, -1.0]])
    y = t([[1, 0, 1], [0, 0, 0], [1, 0, 0]])
    m = t([[1, 1, 1], [1, 1, 1], [1, 0, 1]])
    # image 0: positives {1.0, 0.0} vs negatives {2.0}
    l0 = (-math.log(math.exp(1) / (math.exp(1) + math.exp(2))) - math.log(1 / (1 + math.exp(2)))) / 2
    # image 1: no positive -> left out of the mean; image 2: the masked 3.0 is not a negative
    l2 = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-1.0)))
    assert msml(x, y, m).item() == pytest.approx((l0 + l2) / 2, rel=1e-6)


def test_msml_without_negatives_or_positives_is_zero_with_finite_gradient():
    x = t([[1.0, 2.0], [0.0, 0.0]]).requires_grad_()
    y = t([[1, 1], [0, 0]])
    loss = msml(x, y, torch.ones_like(y))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(x.grad).all()


def test_make_loss_sums_parts_and_refuses_unknown_names():
    x, y, m = t([[0.2, -0.4]]), t([[1, 0]]), t([[1, 1]])
    fn, _ = make_loss("bce+msml", y, m)
    assert fn(x, y, m).item() == pytest.approx(bce(x, y, m).item() + msml(x, y, m).item(), rel=1e-6)
    with pytest.raises(ValueError, match="--loss 'hinge'"):
        make_loss("hinge", y, m)


def test_weighted_bce_follows_the_logits_device():
    """pos_weight is fitted on CPU; logits on another device (meta stands in for CUDA) must not fail."""
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    loss_fn, _ = make_loss("weighted_bce", targets, torch.ones_like(targets))
    logits = torch.zeros(3, 2, device="meta")
    assert loss_fn(logits, targets.to("meta"), torch.ones(3, 2, device="meta")).device.type == "meta"
