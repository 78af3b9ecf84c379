"""DeLong's test of two correlated AUROCs (Sun & Xu's midrank algorithm): against pROC's published numbers on
its aSAH data, against a direct O(m n) implementation of DeLong 1988 on data with ties, its size under the null,
the undefined cases, Holm's adjustment and its speed."""

import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from common.evaluation.delong import delong_covariance, delong_per_class, delong_test, holm

# pROC's aSAH data (Turck et al. 2010, Intensive Care Medicine 36:107; shipped with pROC, Robin et al. 2011):
# 113 patients after an aneurysmal subarachnoid haemorrhage, outcome 1 = poor, the WFNS grade (1-5) and the
# serum S100B (ug/L), in the data set's row order.
ASAH_POOR = "00001101001011001011101000000000100110110000000001100010001010011101101111000110100000010000000000001111110001000"
ASAH_WFNS = "11113254125255125225211112121134214541425511241125521251222151125214524414121421232421451154221113125225552445111"
ASAH_S100B = """0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07 0.33 0.09 0.09
0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09 0.96 0.25 0.5 0.46 0.16 0.07 0.43 0.45
0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.1 0.14 0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09
0.27 0.71 0.08 0.26 0.08 0.16 0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15
0.08 0.14 0.1 0.07 0.04 0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48"""


def asah():
    y = np.array([int(c) for c in ASAH_POOR])
    return y, np.array([int(c) for c in ASAH_WFNS], dtype=float), np.array(ASAH_S100B.split(), dtype=float)


def test_published_example_procs_roc_test_on_asah():
    """pROC 1.18, tests/testthat/test-roc.test.R and test-var.R: roc.test(r.wfns, r.s100b) gives
    Z = 2.20898359144091, p = 0.0271757822291882, 95% CI 0.0104061769564846 to 0.174214419249478;
    var(r.wfns) = 0.00146991470882363, var(r.s100b) = 0.00266868245717244."""
    y, wfns, s100b = asah()
    assert (len(y), y.sum()) == (113, 41)
    r = delong_test(y, wfns, s100b)
    assert r.auc_a == pytest.approx(0.8236789, abs=1e-7) and r.auc_b == pytest.approx(0.7313686, abs=1e-7)
    assert r.z == pytest.approx(2.20898359144091, rel=1e-12)
    assert r.p == pytest.approx(0.0271757822291882, rel=1e-10)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.0104061769564846, 0.174214419249478), rel=1e-10)
    _, cov = delong_covariance(y, np.column_stack([wfns, s100b]))
    assert np.diag(cov) == pytest.approx([0.00146991470882363, 0.00266868245717244], rel=1e-12)
    flipped = delong_test(y, s100b, wfns)  # the sign follows the order, p does not
    assert flipped.z == pytest.approx(-r.z) and flipped.p == pytest.approx(r.p)
    assert (flipped.ci_low, flipped.ci_high) == pytest.approx((-r.ci_high, -r.ci_low))


def direct_delong(y, scores):
    """DeLong et al. 1988 as written: the Mann-Whitney kernel psi over every (positive, negative) pair."""
    y = np.asarray(y).astype(bool)
    aucs, v10, v01 = [], [], []
    for s in scores.T:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    aucs, v10, v01 = np.array(aucs), np.array(v10), np.array(v01)
    m, n = v10.shape[1], v01.shape[1]
    s10 = (v10 - aucs[:, None]) @ (v10 - aucs[:, None]).T / (m - 1)
    s01 = (v01 - aucs[:, None]) @ (v01 - aucs[:, None]).T / (n - 1)
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_algorithm_equals_the_direct_one_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 400
    y = rng.random(n) < 0.3
    base = rng.normal(size=n) + 0.8 * y
    scores = np.column_stack([np.round(base, 1), np.round(base + rng.normal(scale=0.7, size=n), 1),
                              rng.integers(0, 4, n).astype(float)])  # rounded, and a 4-level score: many ties
    aucs, cov = delong_covariance(y, scores)
    want_aucs, want_cov = direct_delong(y, scores)
    np.testing.assert_allclose(aucs, want_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, want_cov, rtol=1e-10)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, s) for s in scores.T], rtol=1e-12)  # ties half
    r = delong_test(y, scores[:, 0], scores[:, 1])
    var = want_cov[0, 0] + want_cov[1, 1] - 2 * want_cov[0, 1]
    assert r.se == pytest.approx(np.sqrt(var), rel=1e-10)
    assert r.p == pytest.approx(2 * norm.sf(abs(want_aucs[0] - want_aucs[1]) / np.sqrt(var)), rel=1e-8)


def test_size_under_the_null_is_near_five_percent():
    """Two scores of the same AUROC: p < 0.05 in about 5% of 400 data sets."""
    rng = np.random.default_rng(3)
    rejected = 0
    for _ in range(400):
        y = rng.random(200) < 0.3
        shared = rng.normal(size=200)
        a = shared + rng.normal(size=200) + 1.0 * y
        b = shared + rng.normal(size=200) + 1.0 * y
        rejected += delong_test(y, a, b).p < 0.05
    assert 0.02 <= rejected / 400 <= 0.09


def test_undefined_cases_give_none_and_a_note():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    no_pos = delong_test([0, 0, 0, 0], s, s[::-1])
    assert no_pos.auc_a is None and no_pos.p is None and "no positives" in no_pos.note
    assert "no negatives" in delong_test([1, 1, 1, 1], s, s).note
    one = delong_test([0, 0, 0, 1], s, s[::-1])
    assert one.auc_a == pytest.approx(roc_auc_score([0, 0, 0, 1], s)) and one.p is None and "one positive" in one.note
    same = delong_test([0, 1, 0, 1], s, s * 2)  # the same ranking: no difference, and no variance of it
    assert (same.difference, same.z, same.p) == (0.0, 0.0, 1.0) and "zero variance" in same.note
    perfect = delong_test([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.1, 0.2, 0.8, 0.9])
    assert perfect.auc_a == 1.0 and perfect.p == 1.0
    with pytest.raises(ValueError, match="finite"):
        delong_test([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], s)


def test_per_class_tests_each_class_over_its_own_entries():
    rng = np.random.default_rng(4)
    y = (rng.random((300, 3)) < 0.3).astype(np.int8)
    a, b = rng.random((300, 3)) + 0.5 * y, rng.random((300, 3)) + 0.3 * y
    mask = rng.random((300, 3)) > 0.2
    y[:, 2] = 0  # a class without positives
    got = delong_per_class(y, a, b, mask)
    for c in range(2):
        want = delong_test(y[mask[:, c], c], a[mask[:, c], c], b[mask[:, c], c])
        assert got[c] == want and got[c].n_pos + got[c].n_neg == mask[:, c].sum()
    assert got[2].p is None and "no positives" in got[2].note


def test_holm_adjustment():
    # By hand: sorted 0.01, 0.02, 0.04 (x3, x2, x1) -> 0.03, 0.04, 0.04 (made monotone); None stays out.
    assert holm([0.04, None, 0.01, 0.02]) == pytest.approx([0.04, None, 0.03, 0.04])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == []


def test_fourteen_classes_on_nih_sized_test_set_is_fast():
    rng = np.random.default_rng(5)
    n, k = 25_596, 14
    y = (rng.random((n, k)) < 0.08).astype(np.int8)
    a = np.round(rng.random((n, k)) + 0.5 * y, 3)
    b = np.round(a + rng.normal(scale=0.3, size=(n, k)), 3)
    started = time.perf_counter()
    results = delong_per_class(y, a, b)
    assert time.perf_counter() - started < 2.0  # ~0.12 s measured on two shared cores
    assert all(r.p is not None for r in results)
