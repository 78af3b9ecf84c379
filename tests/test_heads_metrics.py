"""Metrics against scikit-learn and against small cases worked out by hand."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from common.data.labels import CHEXPERT_LABELS
from common.data.targets import finding_flags
from common.evaluation.metrics import (at_thresholds, choose_thresholds, d_auc, evaluate, fast_auroc, n_auc, per_class_auroc,
                           weighted_auc)
from common.runs.rundir import jsonable

# Two classes A, B; scores per class. Worked by hand in the tests below.
Y = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [0, 0]], dtype=np.float32)
S = np.array([[0.9, 0.3], [0.4, 0.8], [0.5, 0.7], [0.3, 0.2], [0.2, 0.1], [0.1, 0.35]])


def test_per_class_auroc_matches_sklearn_on_masked_entries():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(np.float32)
    s = rng.random((200, 4)) + 0.3 * y
    mask = rng.random((200, 4)) > 0.2
    aucs, notes = per_class_auroc(y, s, mask)
    for c in range(4):
        assert aucs[c] == pytest.approx(roc_auc_score(y[mask[:, c], c], s[mask[:, c], c]))
    assert notes == []


def test_fast_auroc_for_progress_lines_equals_sklearn_with_ties_and_mask():
    rng = np.random.default_rng(2)
    y = (rng.random((300, 3)) < 0.2).astype(np.float32)
    s = np.round(rng.random((300, 3)) + 0.5 * y, 1)  # rounding makes many ties
    mask = rng.random((300, 3)) > 0.3
    y[:, 2] = 0  # no positives: NaN, as in per_class_auroc
    np.testing.assert_allclose(fast_auroc(y, s, mask), per_class_auroc(y, s, mask)[0], rtol=1e-12)


def test_hand_built_auroc_d_auc_and_n_auc():
    auc, _ = per_class_auroc(Y, S)
    # A: positives {.9, .4} vs negatives {.5, .3, .2, .1}: 4 + 3 of 8 pairs.
    assert auc[0] == pytest.approx(7 / 8)
    d, _ = d_auc(Y, S)
    # A vs negatives with another disease {.5, .3}: 3 of 4; B vs {.3} (image 0 has A): 2 of 3.
    assert d.tolist() == pytest.approx([3 / 4, 2 / 3])
    n, _ = n_auc(Y, S)
    # A vs No Finding {.2, .1}: 4 of 4; B {.8, .7, .2} vs {.1, .35}: 5 of 6.
    assert n.tolist() == pytest.approx([1.0, 5 / 6])


def test_finding_flags_from_the_full_label_set_change_d_and_n_auc():
    # Image 4 has a disease outside the two evaluated labels: another-disease negative, not No Finding.
    has_disease = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    no_finding = np.array([0, 0, 0, 0, 0, 1], dtype=bool)
    d, _ = d_auc(Y, S, has_disease=has_disease)
    n, _ = n_auc(Y, S, no_finding=no_finding)
    assert d[0] == pytest.approx(5 / 6)  # {.9, .4} vs {.5, .3, .2}
    assert n[0] == pytest.approx(1.0)  # {.9, .4} vs {.1}


def test_finding_flags_ignore_no_finding_and_support_devices_columns():
    names = CHEXPERT_LABELS
    labels = np.zeros((3, len(names)), dtype=np.int8)
    labels[0, names.index("No Finding")] = 1
    labels[0, names.index("Support Devices")] = 1  # a device is not a disease
    labels[1, names.index("Edema")] = 1
    labels[2, names.index("Edema")] = -1  # uncertain: neither a disease nor No Finding
    has_disease, no_finding = finding_flags(labels, names)
    assert has_disease.tolist() == [False, True, False]
    assert no_finding.tolist() == [True, False, False]


def test_weighted_auc_weights_by_positives_and_skips_nan():
    y = np.zeros((10, 3), dtype=np.float32)
    y[:3, 0] = 1  # 3 positives
    y[:1, 1] = 1  # 1 positive
    aucs = np.array([0.8, 0.6, np.nan])  # class 2 has no positives
    assert weighted_auc(aucs, y) == pytest.approx((0.8 * 3 + 0.6 * 1) / 4)
    assert np.isnan(weighted_auc(np.full(3, np.nan), y))


def test_missing_positives_give_nan_and_a_note_not_a_crash():
    y = Y.copy()
    y[:, 1] = 0
    result = evaluate(y, S, names=["A", "B"], thresholds=np.array([0.5, 0.5]))
    per = result["per_class"]["B"]
    assert np.isnan(per["auroc"]) and np.isnan(per["d_auc"]) and np.isnan(per["n_auc"])
    assert any("B: no positives, AUROC is NaN" in n for n in result["notes"])
    assert result["summary"]["mean_auc"] == pytest.approx(per_class_auroc(y, S)[0][0])
    json.dumps(jsonable(result), allow_nan=False)  # what metrics.json does with NaN


def test_d_auc_without_other_disease_negatives_is_nan_with_note():
    y = np.array([[1], [0], [0]], dtype=np.float32)
    d, notes = d_auc(y, np.array([[0.9], [0.2], [0.1]]), names=["A"])
    assert np.isnan(d[0]) and "negatives with another disease" in notes[0]


def test_thresholds_maximize_f1_and_threshold_metrics_match_sklearn():
    y = np.array([[0], [0], [1], [1]], dtype=np.float32)
    s = np.array([[0.1], [0.6], [0.4], [0.8]])
    thr, notes = choose_thresholds(y, s)
    assert thr[0] == pytest.approx(0.4) and notes == []  # F1 0.8 at 0.4; 0.5 at 0.6; 0.67 at 0.8
    rng = np.random.default_rng(1)
    y = (rng.random((100, 2)) < 0.4).astype(np.float32)
    s = rng.random((100, 2))
    out = at_thresholds(y, s, np.array([0.5, 0.3]))
    for c, th in enumerate((0.5, 0.3)):
        pred = s[:, c] >= th
        assert out["precision"][c] == pytest.approx(precision_score(y[:, c], pred))
        assert out["recall"][c] == pytest.approx(recall_score(y[:, c], pred))
        assert out["f1"][c] == pytest.approx(f1_score(y[:, c], pred))
        assert out["accuracy"][c] == pytest.approx(np.mean(pred == y[:, c]))


def test_threshold_without_positives_falls_back_to_half():
    thr, notes = choose_thresholds(np.zeros((4, 1)), np.random.default_rng(0).random((4, 1)), names=["A"])
    assert thr[0] == 0.5 and "A: no positives" in notes[0]


def test_chexpert_baseline_is_the_row_of_the_runs_policy():
    from common.evaluation.baselines import for_dataset

    assert [b.title for b in for_dataset("nih", "ignore")] == ["Wang 2017", "CheXNet"]
    (ignore,) = for_dataset("chexpert", "ignore")
    (ones,) = for_dataset("chexpert", "ones")
    assert ignore.title == "CheXpert paper U-Ignore" and ignore.auroc["Atelectasis"] == 0.818
    assert ones.auroc["Atelectasis"] == 0.858 and ones.auroc["Consolidation"] == 0.899
    assert for_dataset("chexpert", "zeros")[0].auroc["Cardiomegaly"] == 0.840
    assert for_dataset("chexpert", None) == []


def test_split_scores_read_the_raw_labels_of_the_chosen_columns_and_flag_findings_over_all():
    """One split's scores as heads and fine-tuning build them: uncertain entries masked, the chosen
    labels' columns in their order, D-/N-AUC flags over every disease label, studies for CheXpert."""
    from common.evaluation.scores import split_scores

    names = ("Atelectasis", "Cardiomegaly", "Edema", "No Finding")
    labels = np.array([[1, -1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0]], dtype=np.int8)
    ids = np.array([f"CheXpert-v1.0-small/valid/patient00001/study{i // 2 + 1}/view{i % 2 + 1}_frontal.jpg"
                    for i in range(4)], dtype=object)
    probs = np.full((4, 2), 0.5)
    s = split_scores(ids, probs, labels, names, ["Cardiomegaly", "Atelectasis"], np.array(["p"] * 4), "chexpert")
    assert s.y.tolist() == [[0, 1], [0, 0], [0, 0], [0, 0]]
    assert s.mask.tolist() == [[False, True], [True, True], [True, True], [True, False]]
    assert s.has_disease.tolist() == [True, True, False, False]  # Edema counts, though not scored
    assert s.no_finding.tolist() == [False, False, True, False]  # an uncertain label is not no finding
    assert s.study_id.tolist() == ["patient00001/study1"] * 2 + ["patient00001/study2"] * 2
    assert s.probs is probs and s.patient_id.tolist() == ["p"] * 4
    assert split_scores(ids, probs, labels, names, ["Edema"], dataset="nih").study_id is None
