"""Patient-level bootstrap intervals of AUROC: the draws against explicit resamples, the unit,
seeding, skipped draws and speed."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.evaluation.bootstrap import bootstrap_auroc, bootstrap_auroc_draws, bootstrap_counts, patient_groups
from common.evaluation.metrics import evaluate, per_class_auroc
from common.runs.rundir import jsonable


def scored_split(n=600, patients=200, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.2).astype(np.float32)
    s = np.round(rng.random((n, k)) + 0.6 * y, 2)  # rounded: ties, which count half
    mask = rng.random((n, k)) > 0.1
    return y, s, mask, rng.integers(0, patients, n).astype(str)


def test_draws_are_the_auroc_of_explicit_patient_resamples():
    y, s, mask, pid = scored_split()
    groups, unit, notes = patient_groups(pid, len(y))
    assert unit == "patient" and notes == []
    aucs = bootstrap_auroc_draws(y, s, groups, mask, draws=50, seed=7)
    counts = next(bootstrap_counts(groups.max() + 1, 50, np.random.default_rng(7)))
    assert (counts.sum(axis=1) == groups.max() + 1).all()  # as many patients drawn as the split has
    for d in range(5):
        rows = np.repeat(np.arange(len(y)), counts[d, groups])  # every image of a drawn patient, once per draw
        for c in range(y.shape[1]):
            keep = mask[rows, c]
            assert aucs[d, c] == pytest.approx(roc_auc_score(y[rows, c][keep], s[rows, c][keep]), abs=1e-12)


def test_patient_level_interval_is_wider_than_image_level():
    # 40 patients of 10 identical images each: really 40 observations, not 400.
    rng = np.random.default_rng(1)
    y1 = (rng.random((40, 1)) < 0.4).astype(np.float32)
    s1 = rng.random((40, 1)) + 0.8 * y1
    y, s, pid = np.repeat(y1, 10, axis=0), np.repeat(s1, 10, axis=0), np.repeat(np.arange(40), 10).astype(str)
    by_patient = bootstrap_auroc(y, s, patient_ids=pid)
    by_image = bootstrap_auroc(y, s)
    assert by_patient.settings["unit"] == "patient" and by_patient.settings["units"] == 40
    assert by_image.settings["unit"] == "image" and "resample images" in by_image.notes[0]
    width = lambda r: r.high[0] - r.low[0]
    assert width(by_patient) > 2 * width(by_image)  # sqrt(10) ~ 3.2 in theory


def test_same_seed_same_interval_other_seed_another():
    y, s, mask, pid = scored_split()
    a, b = bootstrap_auroc(y, s, mask, pid, seed=0), bootstrap_auroc(y, s, mask, pid, seed=0)
    c = bootstrap_auroc(y, s, mask, pid, seed=1)
    np.testing.assert_array_equal(a.low, b.low)
    np.testing.assert_array_equal(a.high, b.high)
    assert a.mean_low == b.mean_low and a.mean_high == b.mean_high
    assert not np.array_equal(a.low, c.low) and a.mean_low != c.mean_low


def test_interval_holds_the_point_estimate():
    y, s, mask, pid = scored_split()
    auc, _ = per_class_auroc(y, s, mask)
    r = bootstrap_auroc(y, s, mask, pid)
    assert (r.low < auc).all() and (auc < r.high).all() and (r.high - r.low < 0.3).all()
    assert r.mean_low < np.mean(auc) < r.mean_high
    assert r.settings["valid_draws"]["mean"] == 1000 and (r.valid == 1000).all()


def test_one_positive_class_skips_the_draws_that_miss_it():
    y, s, mask, pid = scored_split(n=200, patients=100, k=2)
    y[:, 1] = 0
    y[0, 1], mask[0, 1] = 1, True
    pid[0] = "only-positive"  # a patient of one image: drawn at least once in 1 - (1 - 1/100)^100 ~ 63% of draws
    groups, _, _ = patient_groups(pid, len(y))
    draws = bootstrap_auroc_draws(y, s, groups, mask)
    finite = draws[np.isfinite(draws[:, 1]), 1]
    r = bootstrap_auroc(y, s, mask, pid)
    assert 550 < r.valid[1] == len(finite) < 720 and r.valid[0] == 1000
    assert (r.low[1], r.high[1]) == tuple(np.percentile(finite, [2.5, 97.5]))
    assert r.settings["valid_draws"]["mean"] == 1000  # class 0 is in every draw


def test_too_few_valid_draws_give_no_interval_and_a_reason():
    # Class B: its positive and its negative belong to two of three patients; both are drawn in ~44% of draws.
    y = np.array([[1, 1], [0, 0], [1, 0], [0, 1]], dtype=np.float32)
    s = np.array([[0.9, 0.8], [0.1, 0.3], [0.7, 0.2], [0.2, 0.6]])
    mask = np.array([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=bool)
    pid = np.array(["p", "q", "r", "r"])
    result = evaluate(y, s, mask, ["A", "B"], patient_ids=pid)
    b = result["per_class"]["B"]
    assert np.isfinite(b["auroc"]) and np.isnan(b["auroc_ci_low"]) and np.isnan(b["auroc_ci_high"])
    valid = result["bootstrap"]["valid_draws"]["B"]
    assert 380 < valid < 500
    assert any(n.startswith(f"B: no AUROC interval, {valid} of 1000 bootstrap draws") for n in result["notes"])
    json.dumps(jsonable(result), allow_nan=False)  # null in metrics.json


def test_missing_patient_ids_are_patients_of_their_own():
    groups, unit, notes = patient_groups(np.array(["a", None, "a", np.nan, "b"], dtype=object), 5)
    assert unit == "patient" and groups[0] == groups[2] and len(set(groups.tolist())) == 4
    assert notes == ["2 images without a patient id resampled as patients of their own"]


def test_evaluate_records_intervals_and_settings_or_none_when_off():
    y, s, mask, pid = scored_split(k=2)
    result = evaluate(y, s, mask, ["A", "B"], patient_ids=pid)
    assert result["bootstrap"]["draws"] == 1000 and result["bootstrap"]["seed"] == 0
    assert result["bootstrap"]["unit"] == "patient" and set(result["bootstrap"]["valid_draws"]) == {"A", "B", "mean"}
    summary = result["summary"]
    assert summary["mean_auc_ci_low"] < summary["mean_auc"] < summary["mean_auc_ci_high"]
    off = evaluate(y, s, mask, ["A", "B"], patient_ids=pid, bootstrap_draws=0)
    assert "bootstrap" not in off and "auroc_ci_low" not in off["per_class"]["A"]
