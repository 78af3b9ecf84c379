"""cxr compare: runs side by side, refused when they were not scored on the same images and truth; each run
paired against a reference (DeLong, Holm, paired bootstrap); the policy table only where it means something."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from common.evaluation.delong import delong_test, holm
from heads import compare, train
from tests.heads_fixtures import synthetic_store

FAST = ["--epochs", "8", "--batch-size", "64", "--threads", "1", "--quiet", "--bootstrap-draws", "500"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    stores, out = tmp_path_factory.mktemp("stores"), tmp_path_factory.mktemp("runs")
    signal = synthetic_store(stores / "signal", signal=2.5, seed=1)
    other_truth = synthetic_store(stores / "other-truth", signal=2.5, seed=2)  # the same image ids, other labels
    smaller = synthetic_store(stores / "smaller", sizes={"train": 600, "val": 300, "test": 200}, signal=2.5, seed=1)
    uncertain = synthetic_store(stores / "uncertain", label_names=("A", "B", "C"), signal=1.0, seed=3, uncertain=0.15,
                                dataset="table")
    made = {}
    for name, store, extra in [("linear", signal, ["--head", "linear"]), ("mlp", signal, ["--head", "mlp3"]),
                               ("other-truth", other_truth, ["--head", "linear"]),
                               ("smaller", smaller, ["--head", "linear"]),
                               ("linear-ones", signal, ["--head", "linear", "--policy", "ones"]),
                               ("table-ignore", uncertain, ["--head", "linear"]),
                               ("table-ones", uncertain, ["--head", "linear", "--policy", "ones"])]:
        train.main(["--store", str(store), "--out", str(out / name), *extra, *FAST])
        made[name] = out / name
    return made


def test_table_holds_each_runs_own_metrics_and_the_settings_that_differ(runs, tmp_path):
    summary = compare.main([str(runs["linear"]), str(runs["mlp"]), "--out", str(tmp_path / "cmp")])
    frame = pd.read_csv(summary["csv"])
    for name in ("linear", "mlp"):
        metrics = json.loads((runs[name] / "metrics.json").read_text())["splits"]["test"]
        got = frame[frame["run"] == name].set_index("class")
        assert list(got.index) == [*metrics["per_class"], "mean"]
        assert got.loc["mean", "auroc"] == pytest.approx(metrics["summary"]["mean_auc"])
        assert got.loc["mean", "ci_low"] == pytest.approx(metrics["summary"]["mean_auc_ci_low"])
        for cls, entry in metrics["per_class"].items():
            assert got.loc[cls, "auroc"] == pytest.approx(entry["auroc"])
            assert got.loc[cls, "n_pos"] == entry["n_pos"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "same 300 test images" in md
    assert "| head | linear | mlp3 |" in md  # the one setting that differs...
    assert "| lr |" not in md and "| policy |" not in md  # ...and not the ones that agree
    mean_row = next(line for line in md.splitlines() if line.startswith("| **mean**"))
    assert mean_row.count("**") == 4  # the label and the best of the two


def test_runs_on_other_images_or_other_truth_are_refused(runs, tmp_path, capsys):
    for other, why in (("smaller", "scored on other test images"), ("other-truth", "with other ground truth")):
        with pytest.raises(SystemExit) as exit_:
            compare.cli([str(runs["linear"]), str(runs[other]), "--out", str(tmp_path / other)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and str(runs[other]) in err
        assert not (tmp_path / other).exists()


def test_refusals_are_one_line(runs, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    done = tmp_path / "done"
    compare.main([str(runs["linear"]), str(runs["mlp"]), "--out", str(done)])
    before = (done / "comparison.md").read_text()
    capsys.readouterr()
    cases = [([str(tmp_path / "plain"), str(runs["mlp"])], "not a run directory"),
             ([str(runs["linear"])], "at least two runs"),
             ([str(runs["linear"]), str(runs["linear"])], "run names repeat"),
             ([str(runs["linear"]), str(runs["mlp"]), "--names", "a"], "--names: 1 names for 2 runs"),
             ([str(runs["linear"]), str(runs["mlp"]), "--reference", "nope"], "--reference nope: not one of the runs"),
             ([str(runs["linear"]), str(runs["mlp"]), "--bootstrap-draws", "50"], "--bootstrap-draws 50")]
    for argv, why in cases:
        with pytest.raises(SystemExit):
            compare.cli([*argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err
    with pytest.raises(SystemExit):
        compare.cli([str(runs["linear"]), str(runs["mlp"]), "--out", str(done)])
    assert "pass --overwrite" in capsys.readouterr().err
    assert (done / "comparison.md").read_text() == before
    compare.main([str(runs["linear"]), str(runs["linear"]), "--names", "a,b", "--out", str(done), "--overwrite"])
    assert "settings are the same" in (done / "comparison.md").read_text()


def _predictions(run, split="test"):
    return pd.read_parquet(run / "predictions" / f"{split}.parquet").sort_values("image_id").reset_index(drop=True)


def test_paired_table_tests_each_run_against_the_reference(runs, tmp_path, capsys):
    summary = compare.main([str(runs["linear"]), str(runs["mlp"]), "--out", str(tmp_path / "cmp")])
    paired = pd.read_csv(summary["paired_csv"])
    metrics = {n: json.loads((runs[n] / "metrics.json").read_text())["splits"]["test"] for n in ("linear", "mlp")}
    preds = {n: _predictions(runs[n]) for n in ("linear", "mlp")}
    rows = paired.set_index("class")
    assert list(rows.index) == [*metrics["mlp"]["per_class"], "mean"] and set(paired["run"]) == {"mlp"}
    assert set(paired["reference"]) == {"linear"}
    for name, entry in metrics["mlp"]["per_class"].items():
        row = rows.loc[name]
        assert row["difference"] == pytest.approx(entry["auroc"] - metrics["linear"]["per_class"][name]["auroc"], abs=1e-6)
        truth = preds["mlp"]["label:" + name].to_numpy()
        keep = truth >= 0
        want = delong_test(truth[keep] == 1, preds["mlp"][name].to_numpy()[keep], preds["linear"][name].to_numpy()[keep])
        assert row["delong_p"] == pytest.approx(want.p, rel=1e-9, abs=1e-300) and row["n_pos"] == entry["n_pos"]
        assert row["bootstrap_ci_low"] < row["difference"] < row["bootstrap_ci_high"]
    assert paired["delong_p_holm"].iloc[:-1].tolist() == pytest.approx(holm(paired["delong_p"].iloc[:-1].tolist()))
    mean = rows.loc["mean"]
    assert mean["difference"] == pytest.approx(metrics["mlp"]["summary"]["mean_auc"] - metrics["linear"]["summary"]["mean_auc"],
                                               abs=1e-6)
    assert np.isnan(mean["delong_p"]) and mean["bootstrap_ci_low"] < mean["difference"] < mean["bootstrap_ci_high"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Paired differences against linear (test, the same 300 images" in md and "### mlp − linear" in md
    assert "Multiple comparisons: 14 per-class tests" in md and "p (Holm)" in md and "(bootstrap) | — |" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    printed = capsys.readouterr().out
    assert printed.startswith("## Paired differences against linear") and "| **mean** |" in printed


def test_reference_flag_turns_the_sign_and_zero_draws_leave_no_interval(runs, tmp_path):
    first = pd.read_csv(compare.main([str(runs["linear"]), str(runs["mlp"]), "--bootstrap-draws", "0",
                                      "--out", str(tmp_path / "a")])["paired_csv"])
    turned = pd.read_csv(compare.main([str(runs["linear"]), str(runs["mlp"]), "--reference", "mlp",
                                       "--bootstrap-draws", "0", "--out", str(tmp_path / "b")])["paired_csv"])
    assert set(turned["run"]) == {"linear"} and set(turned["reference"]) == {"mlp"}
    np.testing.assert_allclose(turned["difference"], -first["difference"], atol=1e-12)
    np.testing.assert_allclose(turned["delong_p"].iloc[:-1], first["delong_p"].iloc[:-1])
    assert turned[["bootstrap_ci_low", "bootstrap_ci_high", "bootstrap_p"]].isna().all().all()
    md = (tmp_path / "b" / "comparison.md").read_text()
    assert "no bootstrap (--bootstrap-draws 0)" in md and "## Paired differences against mlp" in md
    mean_row = next(line for line in md.splitlines() if line.startswith("| **mean** |") and "—" in line)
    assert mean_row.endswith("| — | — | — |")  # no interval, no p, no Holm: shown as —, never nan
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)


def test_patients_come_from_the_predictions_files_or_images_are_resampled_with_a_note(runs, tmp_path):
    copies = {}
    for name in ("linear", "mlp"):
        copies[name] = shutil.copytree(runs[name], tmp_path / name)
    for with_ids in (True, False):
        for run in copies.values():
            path = run / "predictions" / "test.parquet"
            frame = pd.read_parquet(path).drop(columns=["patient_id"], errors="ignore")
            if with_ids:  # two images per patient
                frame.insert(1, "patient_id", [f"p{int(i.split('_')[1].split('.')[0]) // 2}" for i in frame["image_id"]])
            frame.to_parquet(path, index=False)
        out = tmp_path / f"cmp-{with_ids}"
        compare.main([str(copies["linear"]), str(copies["mlp"]), "--out", str(out)])
        md = (out / "comparison.md").read_text()
        if with_ids:
            assert "the same 300 images of 150 patients" in md and "paired bootstrap over patients" in md
            assert "no patient_id column" not in md
        else:
            assert "the same 300 images)" in md and "paired bootstrap over images" in md
            assert "no patient_id column" in md


def test_policy_table_only_for_a_policy_alone_on_uncertain_labels(runs, tmp_path):
    def md(*names):
        out = tmp_path / "-".join(names)
        compare.main([*(str(runs[n]) for n in names), "--out", str(out)])
        return (out / "comparison.md").read_text()

    nih = md("linear", "linear-ones")  # NIH: no uncertain label anywhere, the policy has nothing to decide
    assert "Not judged: the nih labels of these runs' test and val images hold no uncertain (-1) entry" in nih
    assert "winner here" not in nih and "CheXpert" not in nih
    confounded = md("mlp", "linear-ones")  # another head as well as another policy
    assert "Not judged: the runs differ in head besides the policy" in confounded and "winner here" not in confounded
    table = md("table-ignore", "table-ones")  # uncertain labels, policy alone: the table, with DeLong, no paper
    assert "| class | winner here (AUROC) | runner-up (AUROC) | difference, p (DeLong) |" in table
    assert "CheXpert paper" not in table
    policy = table[table.index("## Which uncertainty policy wins"):]
    row = next(line for line in policy.splitlines() if line.startswith("| A |"))
    assert re.search(r"\| (ignore|ones) \(0\.\d{3}\) \| (ignore|ones) \(0\.\d{3}\) \| [+-]0\.\d{3}, p [<0-9.]+ \|$", row)


def test_undefined_values_are_a_dash_and_one_positive_gets_no_interval(tmp_path):
    from common.evaluation.comparison import Run, paired_comparison, paired_lines

    rng = np.random.default_rng(0)
    n = 120
    truth = pd.DataFrame({"image_id": [f"i{i:03d}" for i in range(n)],
                          "label:A": (rng.random(n) < 0.3).astype(np.int8),
                          "label:B": np.r_[1, np.zeros(n - 1)].astype(np.int8),  # one positive
                          "label:C": np.zeros(n, dtype=np.int8)})  # none
    runs = [Run(name, tmp_path, "head", {}, {"label_names": ["A", "B", "C"]}, truth, rng.random((n, 3)), None)
            for name in ("a", "b")]
    paired = paired_comparison(runs, draws=200)
    rows = paired.frame.set_index("class")
    assert "one positive" in rows.loc["B", "note"] and pd.isna(rows.loc["B", "delong_p"])
    assert rows.loc["B", ["bootstrap_ci_low", "bootstrap_ci_high", "bootstrap_p"]].isna().all()
    assert "no positives" in rows.loc["C", "note"] and pd.isna(rows.loc["C", "difference"])
    assert rows.loc["mean", "difference"] == pytest.approx((rows.loc["A", "difference"] + rows.loc["B", "difference"]) / 2)
    assert paired.tests == 1 and paired.n_patients is None
    md = "\n".join(paired_lines(paired, "test"))
    assert "| C | 0 / 120 | — | — | — | — | — | — |" in md and "Multiple comparisons" not in md
    assert "no patient_id column" in md and "the same 120 images)" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
