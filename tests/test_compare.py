"""cxr compare: runs side by side, refused when they were not scored on the same images and truth."""

import json

import pandas as pd
import pytest

from heads import compare, train
from tests.heads_fixtures import synthetic_store

FAST = ["--epochs", "8", "--batch-size", "64", "--threads", "1", "--quiet", "--bootstrap-draws", "500"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    stores, out = tmp_path_factory.mktemp("stores"), tmp_path_factory.mktemp("runs")
    signal = synthetic_store(stores / "signal", signal=2.5, seed=1)
    other_truth = synthetic_store(stores / "other-truth", signal=2.5, seed=2)  # the same image ids, other labels
    smaller = synthetic_store(stores / "smaller", sizes={"train": 600, "val": 300, "test": 200}, signal=2.5, seed=1)
    made = {}
    for name, store, extra in [("linear", signal, ["--head", "linear"]), ("mlp", signal, ["--head", "mlp3"]),
                               ("other-truth", other_truth, ["--head", "linear"]),
                               ("smaller", smaller, ["--head", "linear"])]:
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
             ([str(runs["linear"]), str(runs["mlp"]), "--names", "a"], "--names: 1 names for 2 runs")]
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
