"""The paired patient-level bootstrap of an AUROC difference: its draws against explicit resamples, its
coverage of a known difference, its p, and why pairing matters."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from common.evaluation.bootstrap import (bootstrap_auroc, bootstrap_counts, bootstrap_p, paired_auroc_differences,
                                         paired_bootstrap, patient_groups)

MU_A, MU_B = 1.2, 0.9  # binormal separations of two models' scores
TRUE_DIFFERENCE = norm.cdf(MU_A / np.sqrt(2)) - norm.cdf(MU_B / np.sqrt(2))  # ~0.064


def simulated(rng, patients=150):
    """1-3 images per patient sharing the patient's label and a patient effect; the two models share it and
    part of each image's noise (correlated AUROCs), each score N(mu * y, 1): AUROC = Phi(mu / sqrt 2)."""
    pid = np.repeat(np.arange(patients), rng.integers(1, 4, patients))
    y = (rng.random(patients) < 0.3)[pid].astype(np.int8)
    patient = rng.normal(scale=np.sqrt(0.5), size=patients)[pid]
    image = rng.normal(scale=0.5, size=len(pid))
    a = MU_A * y + patient + image + rng.normal(scale=0.5, size=len(pid))
    b = MU_B * y + patient + image + rng.normal(scale=0.5, size=len(pid))
    return y[:, None], a[:, None], b[:, None], pid.astype(str)


def test_draws_are_differences_of_explicit_paired_resamples():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random((n, 2)) < 0.25).astype(np.int8)
    a, b = np.round(rng.random((n, 2)) + 0.5 * y, 2), np.round(rng.random((n, 2)) + 0.3 * y, 2)
    mask = rng.random((n, 2)) > 0.1
    pid = rng.integers(0, 150, n).astype(str)
    groups, _, _ = patient_groups(pid, n)
    counts = np.vstack(list(bootstrap_counts(groups.max() + 1, 100, np.random.default_rng(7))))
    r = paired_bootstrap(y, a, b, mask, pid, draws=100, seed=7)
    diffs = []
    for d in range(100):
        rows = np.repeat(np.arange(n), counts[d, groups])  # the same patients for both models
        keep = mask[rows, 0]
        diffs.append(roc_auc_score(y[rows, 0][keep], a[rows, 0][keep]) - roc_auc_score(y[rows, 0][keep], b[rows, 0][keep]))
    assert (r.low[0], r.high[0]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    assert r.p[0] == pytest.approx(bootstrap_p(np.array(diffs), 100))
    assert r.settings["unit"] == "patient" and r.valid[0] == 100


def test_interval_covers_a_known_difference_at_about_its_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        y, a, b, pid = simulated(rng)
        r = paired_bootstrap(y, a, b, patient_ids=pid, draws=500, seed=i)
        covered += r.low[0] <= TRUE_DIFFERENCE <= r.high[0]
    assert 0.88 <= covered / 200 <= 0.99  # 0.955 measured


def test_pairing_is_what_narrows_the_interval():
    """Correlated models: the paired interval of A - B is much narrower than the two runs' own intervals suggest."""
    y, a, b, pid = simulated(np.random.default_rng(1), patients=400)
    paired = paired_bootstrap(y, a, b, patient_ids=pid)
    own_a, own_b = bootstrap_auroc(y, a, patient_ids=pid), bootstrap_auroc(y, b, patient_ids=pid)
    assert paired.high[0] - paired.low[0] < 0.6 * ((own_a.high[0] - own_a.low[0]) + (own_b.high[0] - own_b.low[0])) / 2
    assert paired.low[0] > 0 and paired.p[0] < 0.05  # a real 0.064 difference, found
    assert paired.mean_low == pytest.approx(paired.low[0]) and paired.mean_p == pytest.approx(paired.p[0])  # one class


def test_identical_scores_differ_by_zero_with_p_one():
    y, a, _, pid = simulated(np.random.default_rng(2))
    r = paired_bootstrap(y, a, a.copy(), patient_ids=pid, draws=200)
    assert (r.low[0], r.high[0], r.p[0]) == (0.0, 0.0, 1.0)


def test_several_runs_share_one_set_of_draws():
    y, a, b, pid = simulated(np.random.default_rng(3))
    both = paired_auroc_differences(y, b, [a, b], patient_ids=pid, draws=200)
    alone = paired_bootstrap(y, a, b, patient_ids=pid, draws=200)
    assert (both[0].low[0], both[0].high[0]) == (alone.low[0], alone.high[0])
    assert (both[1].low[0], both[1].high[0], both[1].p[0]) == (0.0, 0.0, 1.0)


def test_bootstrap_p_rule():
    assert bootstrap_p(np.full(200, 0.01), 200) == pytest.approx(2 / 201)  # never 0
    assert bootstrap_p(np.r_[np.full(150, 0.01), np.full(50, -0.01)], 200) == pytest.approx(2 * 51 / 201)
    assert np.isnan(bootstrap_p(np.r_[np.full(50, 0.01), np.full(150, np.nan)], 200))  # too few valid draws
