"""Calibration and precision-recall, each checked against an independent computation: ECE against
scikit-learn's calibration_curve, AUPRC against average_precision_score, temperature scaling
against a known temperature; and a head run with --calibrate temperature records and reports them,
fitted on val alone."""

import json
import re
import shutil

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score

from common.evaluation import calibration as cal
from common.evaluation.metrics import evaluate, per_class_auprc, prevalence
from common.runs import rundir
from heads import train
from tests.data_paths import NIH_IMAGES, needs_shared, write_nih_subset
from tests.heads_fixtures import synthetic_store

FAST = ["--epochs", "15", "--batch-size", "64", "--threads", "1", "--quiet"]


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _ece_from_sklearn(y, p, bins=10):
    """ECE from calibration_curve's per-bin points, weighted by the bin counts of the same edges."""
    prob_true, prob_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], p), minlength=bins)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(prob_true - prob_pred)) / counts.sum())


def test_ece_matches_calibration_curve_and_a_direct_sum():
    rng = np.random.default_rng(0)
    p = rng.beta(0.7, 2.0, 5000)
    p[:40] = np.repeat([0.1, 0.2, 0.5, 1.0], 10)  # probabilities on bin edges land in the lower bin, as sklearn's
    y = (rng.random(5000) < p ** 1.5).astype(float)  # over-confident
    counts, mean_prob, frac_pos = cal.bin_stats(y, p)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(frac_pos[counts > 0], prob_true)
    np.testing.assert_allclose(mean_prob[counts > 0], prob_pred)
    assert cal.ece(y, p) == pytest.approx(_ece_from_sklearn(y, p), abs=1e-12)
    direct = sum(abs(y[m].mean() - p[m].mean()) * m.sum() for m in
                 [(p > lo) & (p <= lo + 0.1) if lo else (p <= 0.1) for lo in np.arange(10) / 10] if m.any()) / len(p)
    assert cal.ece(y, p) == pytest.approx(direct, abs=1e-9)
    assert cal.ece(y, np.full(5000, y.mean())) < 1e-12  # the base rate everywhere is calibrated, if useless
    assert np.isnan(cal.ece([], []))


def test_pooled_and_per_class_ece_use_only_scored_entries():
    rng = np.random.default_rng(1)
    p = rng.random((400, 3))
    y = (rng.random((400, 3)) < p).astype(float)
    mask = rng.random((400, 3)) > 0.2
    mask[:, 2] = False
    out = cal.calibration_errors(y, p, mask, ["a", "b", "c"])
    assert out["per_class"]["a"] == pytest.approx(_ece_from_sklearn(y[mask[:, 0], 0], p[mask[:, 0], 0]))
    assert out["pooled"] == pytest.approx(_ece_from_sklearn(y[mask], p[mask]))
    assert np.isnan(out["per_class"]["c"])


def test_auprc_matches_average_precision_score_with_its_prevalence_baseline():
    rng = np.random.default_rng(2)
    y = (rng.random((3000, 3)) < [0.02, 0.3, 0.0]).astype(float)
    s = rng.random((3000, 3)) + y * [1.0, 0.3, 0.0]
    mask = rng.random((3000, 3)) > 0.1
    auprc, notes = per_class_auprc(y, s, mask, ["rare", "common", "absent"])
    for c in range(2):
        assert auprc[c] == pytest.approx(average_precision_score(y[mask[:, c], c], s[mask[:, c], c]))
    assert np.isnan(auprc[2]) and notes == ["absent: no positives, AUPRC is NaN"]
    base = prevalence(y, mask)
    assert base[1] == pytest.approx(y[mask[:, 1], 1].mean()) and base[2] == 0.0
    # A random ranking's AUPRC is about the prevalence: the baseline the report prints beside it.
    noise = rng.random(200_000)
    y_noise = (rng.random(200_000) < 0.05).astype(float)
    assert average_precision_score(y_noise, noise) == pytest.approx(0.05, abs=0.005)
    m = evaluate(y, s, mask, ["rare", "common", "absent"], bootstrap_draws=0)
    assert m["per_class"]["common"]["auprc"] == pytest.approx(auprc[1])
    assert m["summary"]["mean_auprc"] == pytest.approx(np.nanmean(auprc))


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, (20000, 2))
    y = (rng.random((20000, 2)) < _sigmoid(z)).astype(float)  # sigmoid(z) is calibrated
    over = _sigmoid(np.column_stack([2 * z[:, 0], 0.5 * z[:, 1]]))  # logits doubled / halved
    t = cal.fit_temperature(over, y)
    assert t == pytest.approx([2.0, 0.5], rel=0.05)
    assert cal.ece(y[:, 0], cal.apply_temperature(over, t)[:, 0]) < 0.5 * cal.ece(y[:, 0], over[:, 0])
    # A class without a positive on val keeps T = 1, and says so.
    y[:, 1] = 0
    t = cal.fit_temperature(over, y)
    assert t[1] == 1.0
    assert cal.temperature_notes(y, None, t, ["a", "b"]) == [
        "calibration: b: no positive or no negative on val, temperature 1 (probabilities unchanged)"]


def test_temperature_is_monotone_so_it_maps_thresholds_and_keeps_auroc():
    rng = np.random.default_rng(4)
    p = rng.random((500, 2))
    t = np.array([1.7, 0.6])
    q = cal.apply_temperature(p, t)
    thresholds = np.array([0.3, 0.8])
    mapped = cal.apply_temperature(thresholds, t)
    assert ((p >= thresholds) == (q >= mapped)).all()
    assert (np.argsort(p, axis=0) == np.argsort(q, axis=0)).all()


def test_calibration_file_round_trip(tmp_path):
    assert cal.read_calibration(tmp_path) is None
    cal.write_calibration(tmp_path, ["A", "B"], np.array([1.5, 0.8]))
    record = cal.read_calibration(tmp_path)
    assert record == {"method": "temperature", "fitted_on": "val", "temperature": {"A": 1.5, "B": 0.8}}
    assert cal.temperatures(record, ["B", "A"]).tolist() == [0.8, 1.5]
    with pytest.raises(rundir.RunError, match="no temperature for C"):
        cal.temperatures(record, ["A", "C"])


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    store = synthetic_store(root / "store", signal=1.5, seed=5)
    out = root / "run"
    train.main(["--store", str(store), "--out", str(out), "--calibrate", "temperature",
                "--operating-point", "specificity=0.9,sensitivity=0.8", *FAST])
    return out


def _frame_arrays(out, split, names):
    return rundir.read_predictions(out / rundir.PREDICTIONS / f"{split}.parquet", names)


def test_a_calibrated_run_fits_on_val_alone_and_records_it(calibrated_run):
    out = calibrated_run
    metrics = json.loads((out / "metrics.json").read_text())
    names = metrics["label_names"]
    assert json.loads((out / "config.json").read_text())["settings"]["calibrate"] == "temperature"
    record = cal.read_calibration(out)
    assert record["fitted_on"] == "val" and list(record["temperature"]) == names
    # The recorded temperatures are those of val's predictions (raw, as the file keeps them); test plays no part.
    val = _frame_arrays(out, "val", names)
    np.testing.assert_allclose(cal.temperatures(record, names), cal.fit_temperature(val["probs"], val["y"], val["mask"]),
                               rtol=1e-6)
    for split in ("val", "test"):
        c = metrics["splits"][split]["calibration"]
        assert c["bins"] == 10 and c["temperature_fitted_on"] == "val"
        arrays = _frame_arrays(out, split, names)
        assert c["ece"]["pooled"] == pytest.approx(cal.ece(arrays["y"][arrays["mask"]], arrays["probs"][arrays["mask"]]))
        assert set(c["ece"]["per_class"]) == set(c["ece_temperature"]["per_class"]) == set(names)


def test_a_run_has_every_new_metric_and_report_section(calibrated_run):
    out = calibrated_run
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        m = metrics["splits"][split]
        assert m["summary"]["mean_auprc"] is not None
        for entry in m["per_class"].values():
            assert {"auprc", "prevalence", "operating_points"} <= set(entry)
            assert [p["target"] for p in entry["operating_points"]] == ["specificity=0.90", "sensitivity=0.80"]
            assert {"threshold", "sensitivity", "specificity", "ppv", "sensitivity_ci_low", "sensitivity_ci_high",
                    "specificity_ci_low", "specificity_ci_high"} <= set(entry["operating_points"][0])
        assert m["operating_points"] == {"chosen_on": "val", "targets": ["specificity=0.90", "sensitivity=0.80"]}
    text = (out / "report.md").read_text()
    for section in ("## Calibration", "## Operating points", "mean AUPRC", "test AUPRC", "test prevalence",
                    "![reliability test](reliability_test.png)", "![PR test](pr_test.png)", "T-scaled"):
        assert section in text, section
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    for png in ("reliability_val.png", "reliability_test.png", "pr_val.png", "pr_test.png"):
        assert (out / png).stat().st_size > 10_000, png


def test_an_uncalibrated_run_writes_no_calibration_file(tmp_path):
    store = synthetic_store(tmp_path / "store", signal=1.5, seed=6, sizes={"train": 200, "val": 100, "test": 100})
    out = tmp_path / "run"
    train.main(["--store", str(store), "--out", str(out), "--epochs", "3", *FAST[2:]])
    assert not (out / rundir.CALIBRATION).exists()
    c = json.loads((out / "metrics.json").read_text())["splits"]["test"]["calibration"]
    assert "ece_temperature" not in c and "temperature_fitted_on" not in c
    text = (out / "report.md").read_text()
    assert "## Calibration" in text and "T-scaled" not in text


def test_overwrite_removes_the_new_files(calibrated_run, tmp_path):
    for name in (rundir.CALIBRATION, rundir.pr_plot("test"), rundir.reliability_plot("val")):
        (tmp_path / name).write_text("x")
    (tmp_path / "mine.txt").write_text("kept")
    rundir.clear(tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_bad_calibrate_value_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.cli(["--store", str(tmp_path), "--out", str(tmp_path / "r"), "--calibrate", "platt"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "heads.train: error: --calibrate 'platt': choose from none, temperature")


@needs_shared
@pytest.mark.usefixtures("one_torch_thread")
def test_a_fine_tune_run_calibrates_on_val_and_reports_the_new_metrics(tmp_path):
    """jobs/fine_tune.py takes the same --calibrate and --operating-point: 30 real NIH images at 64 px."""
    from jobs import fine_tune

    names = sorted(p.name for p in NIH_IMAGES.iterdir())[:30]
    (tmp_path / "images").mkdir()
    for name in names:
        shutil.copy(NIH_IMAGES / name, tmp_path / "images" / name)
    write_nih_subset(tmp_path, names, csv_name="meta.csv")
    out = tmp_path / "ft"
    fine_tune.main(["--dataset", "nih", "--metadata", str(tmp_path / "meta.csv"), "--images", str(tmp_path / "images"),
                    "--out", str(out), "--backbone", "densenet121", "--weights", "random:0", "--input-size", "64",
                    "--batch-size", "8", "--epochs", "1", "--threads", "1", "--num-workers", "0", "--split", "ratios",
                    "--split-ratios", "0.5,0.25,0.25", "--calibrate", "temperature",
                    "--operating-point", "sensitivity=0.9"])
    record = cal.read_calibration(out)
    assert record["fitted_on"] == "val"
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["calibrate"] == "temperature"
    assert config["settings"]["operating_point"] == ["sensitivity=0.90"]
    metrics = json.loads((out / "metrics.json").read_text())
    names = metrics["label_names"]
    val = _frame_arrays(out, "val", names)
    np.testing.assert_allclose(cal.temperatures(record, names), cal.fit_temperature(val["probs"], val["y"], val["mask"]),
                               rtol=1e-6)
    test = metrics["splits"]["test"]
    assert test["calibration"]["temperature_fitted_on"] == "val" and "mean_auprc" in test["summary"]
    assert test["operating_points"]["targets"] == ["sensitivity=0.90"]
    text = (out / "report.md").read_text()
    assert "## Calibration" in text and "## Operating points" in text
