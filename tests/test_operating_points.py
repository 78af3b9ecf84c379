"""Operating points: thresholds chosen on val meet their target there (checked against a brute-force
search), hold up on a test split drawn from the same population, and come with patient-level
intervals from a bootstrap that keeps the threshold fixed."""

import json

import numpy as np
import pytest

from common.evaluation import operating_points as op


def _scores(n, prevalence, rng, shift=1.5):
    y = (rng.random(n) < prevalence).astype(float)
    return y, rng.normal(0, 1, n) + shift * y


def _rates(y, s, t):
    called = s >= t
    return called[y == 1].mean(), (~called[y == 0]).mean()


def test_targets_parse_to_one_form_and_refuse_bad_ones_in_one_line():
    assert op.parse_targets(None) == op.DEFAULT_TARGETS
    assert op.parse_targets("") == op.DEFAULT_TARGETS
    assert op.parse_targets("Sensitivity=0.9, specificity=0.95,sensitivity=0.90") == (
        "sensitivity=0.90", "specificity=0.95")
    assert op.parse_targets(["specificity=0.975"]) == ("specificity=0.975",)
    for bad in ("sensitivity", "recall=0.9", "specificity=1", "sensitivity=x", "specificity=-0.1"):
        with pytest.raises(ValueError, match=r"^--operating-point '.*': write sensitivity=X or specificity=X") as exc:
            op.parse_targets(bad)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("target", ["specificity=0.90", "specificity=0.95", "sensitivity=0.90", "sensitivity=0.95"])
def test_the_val_threshold_meets_its_target_at_the_best_other_rate(target):
    rng = np.random.default_rng(0)
    y, s = _scores(700, 0.2, rng)
    s[:50] = np.round(s[:50], 1)  # ties
    t = op.threshold_for(y, s, target)
    metric, value = target.split("=")
    # Brute force: every distinct score (and above the highest) as threshold; of those meeting the
    # target, the one with the best other rate.
    candidates = np.append(np.unique(s), np.inf)
    rates = [(c, *_rates(y, s, c)) for c in candidates]
    if metric == "specificity":
        best = max((r for r in rates if r[2] >= float(value)), key=lambda r: (r[1], -r[0]))
    else:
        best = max((r for r in rates if r[1] >= float(value)), key=lambda r: (r[2], r[0]))
    sens, spec = _rates(y, s, t)
    assert (sens, spec) == pytest.approx(best[1:])
    assert (spec if metric == "specificity" else sens) >= float(value)


def test_no_positive_on_val_chooses_nothing_and_scores_nothing():
    rng = np.random.default_rng(1)
    y = np.zeros((100, 2))
    y[:20, 0] = 1
    s = rng.random((100, 2))
    points = op.choose(y, s, None, ["A", "B"], ("specificity=0.90",))
    assert np.isnan(points.thresholds[0, 1]) and np.isfinite(points.thresholds[0, 0])
    assert points.notes == ["thresholds: B: no positive or no negative on val, no operating point chosen"]
    scored = op.score(y, s, None, ["A", "B"], points, draws=200)
    assert [k for k in scored["B"][0]] == ["target", "threshold", "sensitivity", "sensitivity_ci_low",
                                          "sensitivity_ci_high", "specificity", "specificity_ci_low",
                                          "specificity_ci_high", "ppv", "ppv_ci_low", "ppv_ci_high"]
    assert all(np.isnan(v) for k, v in scored["B"][0].items() if k != "target")
    assert np.isfinite(scored["A"][0]["sensitivity_ci_low"])


def test_chosen_on_val_gives_the_target_on_val_and_close_to_it_on_test():
    rng = np.random.default_rng(2)
    yv, sv = _scores(20000, 0.1, rng)
    yt, st = _scores(20000, 0.1, rng)
    patients = np.arange(20000) // 4
    points = op.choose(yv[:, None], sv[:, None], None, ["A"], op.DEFAULT_TARGETS)
    on_val = op.score(yv[:, None], sv[:, None], None, ["A"], points)["A"]
    on_test = op.score(yt[:, None], st[:, None], None, ["A"], points, patients, draws=400)["A"]
    for v, t in zip(on_val, on_test):
        metric, value = v["target"].split("=")
        assert value in ("0.90", "0.95")
        assert float(value) <= v[metric] < float(value) + 0.002  # met on val, with no rate to spare
        assert t[metric] == pytest.approx(float(value), abs=0.02)  # same population: about the target on test
        assert t["threshold"] == v["threshold"]
        for m in ("sensitivity", "specificity", "ppv"):
            assert t[f"{m}_ci_low"] <= t[m] <= t[f"{m}_ci_high"]
        # PPV follows from the rates and the prevalence.
        prev = yt.mean()
        expected = t["sensitivity"] * prev / (t["sensitivity"] * prev + (1 - t["specificity"]) * (1 - prev))
        assert t["ppv"] == pytest.approx(expected)


def test_fixed_threshold_intervals_cover_the_population_rate_about_95_percent():
    """Many small test sets from one population: the interval for specificity at a fixed threshold
    should contain the population's specificity about 95% of the time."""
    rng = np.random.default_rng(3)
    points = op.OperatingPoints(("specificity=0.90",), np.array([[1.2816]]))  # N(0, 1) negatives: spec 0.90
    hits, trials = 0, 200
    for _ in range(trials):
        y, s = _scores(300, 0.3, rng)
        e = op.score(y[:, None], s[:, None], None, ["A"], points, np.arange(300) // 3, draws=300,
                     seed=int(rng.integers(1 << 30)))["A"][0]
        hits += e["specificity_ci_low"] <= 0.90 <= e["specificity_ci_high"]
    assert 0.89 <= hits / trials <= 0.99


def test_report_lines_show_each_target_per_split_and_undefined_as_a_dash():
    entry = {"target": "specificity=0.90", "threshold": 0.4, "sensitivity": 0.7, "sensitivity_ci_low": 0.6,
             "sensitivity_ci_high": 0.8, "specificity": 0.9, "specificity_ci_low": 0.88, "specificity_ci_high": 0.92,
             "ppv": 0.3, "ppv_ci_low": 0.25, "ppv_ci_high": 0.35}
    empty = {k: (None if k != "target" else v) for k, v in entry.items()}
    split = {"operating_points": {"chosen_on": "val", "targets": ["specificity=0.90"]},
             "per_class": {"A": {"operating_points": [entry]}, "B": {"operating_points": [empty]}}}
    lines = op.report_lines({"label_names": ["A", "B"], "splits": {"val": split, "test": split}})
    assert "| A | specificity=0.90 | 0.400 | 0.700 (0.60-0.80) | 0.900 (0.88-0.92) | 0.300 (0.25-0.35) |" in "\n".join(lines)
    assert "| B | specificity=0.90 | — | — | — | — | — | — | — |" in lines
    assert op.report_lines({"label_names": ["A"], "splits": {"test": {"per_class": {"A": {}}}}}) == []


def test_heads_evaluate_takes_thresholds_and_temperatures_from_the_head_run_never_the_scored_store(tmp_path):
    from common.evaluation.calibration import read_calibration
    from heads import evaluate, train
    from tests.heads_fixtures import synthetic_store

    store = synthetic_store(tmp_path / "store", signal=1.5, seed=7, sizes={"train": 300, "val": 150, "test": 150})
    other = synthetic_store(tmp_path / "other", signal=1.5, seed=8, sizes={"train": 30, "val": 40, "test": 150})
    head = tmp_path / "head"
    train.main(["--store", str(store), "--out", str(head), "--epochs", "5", "--batch-size", "64", "--threads", "1",
                "--quiet", "--calibrate", "temperature", "--operating-point", "specificity=0.9"])
    evaluate.main(["--run", str(head), "--store", str(other), "--split", "val", "test", "--out", str(tmp_path / "ev"),
                   "--operating-point", "specificity=0.9", "--bootstrap-draws", "200"])
    head_metrics = json.loads((head / "metrics.json").read_text())
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for split in ("val", "test"):  # the other store's val is scored like test: it chooses nothing
        assert ev["splits"][split]["operating_points"]["chosen_on"] == "the head run's val"
        for name in ev["label_names"]:
            assert (ev["splits"][split]["per_class"][name]["operating_points"][0]["threshold"]
                    == head_metrics["splits"]["val"]["per_class"][name]["operating_points"][0]["threshold"])
        assert ev["splits"][split]["calibration"]["temperature_fitted_on"] == "val"
    assert read_calibration(head)["fitted_on"] == "val"
    text = (tmp_path / "ev" / "report.md").read_text()
    assert "## Operating points" in text and "threshold (the head run's val)" in text and "## Calibration" in text
    # Without the head run's val predictions no operating point can be chosen, and the run says so.
    (head / "predictions" / "val.parquet").unlink()
    evaluate.main(["--run", str(head), "--store", str(other), "--out", str(tmp_path / "ev2"), "--bootstrap-draws", "0"])
    ev2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert "operating_points" not in ev2["splits"]["test"]
    assert any(n.startswith("operating points: none, they are chosen on the head run's val") for n in ev2["notes"])
