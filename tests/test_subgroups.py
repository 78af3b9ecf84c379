"""Subgroup metrics (common/evaluation/subgroups.py): AUROC per sex, age band, view and source against
scikit-learn, too-small groups marked, age band edges, the largest gaps; predictions files that say who
each image is, for head runs, evaluations and ensembles, and old files without those columns."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from common.evaluation import subgroups
from common.evaluation.age_bands import age_bands, band_names, parse_age_bands
from common.runs import rundir
from heads import ensemble, evaluate, train
from tests.heads_fixtures import synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["A", "B", "C"]


def _split(n=600, seed=0):
    """Random truth and scores, class A informative, with sex, age, view and source per image."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(NAMES))) < 0.3).astype(np.float32)
    probs = rng.random((n, len(NAMES)))
    probs[:, 0] = np.clip(0.3 * y[:, 0] + 0.7 * probs[:, 0], 0, 1)
    mask = rng.random((n, len(NAMES))) > 0.05
    sex = rng.choice([1.0, 0.0, np.nan], n, p=[0.48, 0.48, 0.04])
    age = rng.uniform(5, 95, n)
    age[::23] = np.nan
    view = rng.choice(["PA", "AP", ""], n, p=[0.6, 0.38, 0.02]).astype(object)
    groups = subgroups.image_groups(n, sex, age, view, "nih")
    return y, probs, mask, groups, np.array([f"p{i // 3}" for i in range(n)], dtype=object)


def test_each_groups_auroc_is_roc_auc_score_on_its_own_images():
    y, probs, mask, groups, patients = _split()
    sub = subgroups.subgroup_metrics(y, probs, mask, NAMES, groups, patients, draws=200)
    for attribute, values in (("sex", groups["sex"]), ("view", groups["view"])):
        for g, entry in sub[attribute].items():
            rows = np.array([v == g if g != "unknown" else v is None for v in values])
            assert entry["n"] == rows.sum()
            for c, name in enumerate(NAMES):
                e = entry["per_class"][name]
                keep = rows & mask[:, c]
                assert (e["n_pos"], e["n_neg"]) == ((y[keep, c] == 1).sum(), (y[keep, c] == 0).sum())
                if e["auroc"] is not None:
                    assert e["auroc"] == pytest.approx(roc_auc_score(y[keep, c], probs[keep, c]))
                    assert e["auroc_ci_low"] <= e["auroc"] <= e["auroc_ci_high"]
            if entry["scored"]:
                scored = [entry["per_class"][n]["auroc"] for n in NAMES if entry["per_class"][n]["auroc"] is not None]
                assert entry["mean_auc"] == pytest.approx(np.mean(scored))
                assert entry["mean_auc_ci_low"] < entry["mean_auc"] < entry["mean_auc_ci_high"]
    band = age_bands(groups["age"], subgroups.AGE_BANDS) == "40-60"
    keep = band & mask[:, 0]
    assert sub["age"]["40-60"]["per_class"]["A"]["auroc"] == pytest.approx(roc_auc_score(y[keep, 0], probs[keep, 0]))


def test_groups_too_small_to_score_are_marked_never_a_number():
    y, probs, mask, groups, patients = _split()
    unknown = np.flatnonzero([v is None for v in groups["sex"]])  # 22 images
    y[unknown] = 0
    y[unknown[:9]] = 1  # 9 positives a class at most: one short
    sub = subgroups.subgroup_metrics(y, probs, mask, NAMES, groups, patients, draws=0)
    unknown_sex = sub["sex"]["unknown"]
    assert unknown_sex["n"] == sum(v is None for v in groups["sex"]) and not unknown_sex["scored"]
    assert unknown_sex["mean_auc"] is None and "10 positives" in unknown_sex["why"]
    for e in unknown_sex["per_class"].values():
        assert e["auroc"] is None and e["auroc_ci_low"] is None and "needs 10" in e["why"]
    assert sub["source"] == {"nih": {"n": len(y), "scored": False, "why": subgroups.WHOLE_SPLIT}}
    # A class short of negatives is not scored either; the group still scores the others.
    y[:, 1] = 1
    y[:12, 1] = 0
    sub = subgroups.subgroup_metrics(y, probs, mask, NAMES, groups, patients, draws=0)
    assert sub["sex"]["F"]["scored"] and sub["sex"]["F"]["per_class"]["B"]["auroc"] is None
    assert sub["sex"]["F"]["classes_scored"] == 2
    # An age band without images is listed, with its count.
    older = subgroups.subgroup_metrics(y, probs, mask, NAMES, groups, patients, edges=(18, 40, 60, 80, 100), draws=0)
    assert older["age"]["100+"] == {"n": 0, "scored": False, "why": "no images"}
    # Unknown groups never make a gap.
    assert all("unknown" not in gap["groups"] for gap in older["largest_gaps"].values())


def test_age_band_edges():
    assert band_names((18, 40, 60, 80)) == ["<18", "18-40", "40-60", "60-80", "80+"]
    ages = [0, 17.9, 18, 39.99, 40, 79.9, 80, 101, np.nan]
    assert list(age_bands(ages, (18, 40, 60, 80))) == ["<18", "<18", "18-40", "18-40", "40-60", "60-80", "80+", "80+",
                                                       "unknown"]
    assert list(age_bands([10, 65.5], (65.5,))) == ["<65.5", "65.5+"]
    assert parse_age_bands("18, 40,60,80") == (18, 40, 60, 80) and parse_age_bands([50]) == (50,)
    for bad in ("40,18", "0,10", "x", "", "18,18"):
        with pytest.raises(ValueError, match="--age-bands"):
            parse_age_bands(bad)


def test_bad_age_bands_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.cli(["--store", str(tmp_path), "--out", str(tmp_path / "x"), "--age-bands", "60,40"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--age-bands '60,40'" in err


def test_the_largest_gap_is_flagged_with_its_groups():
    rng = np.random.default_rng(3)
    n = 800
    y = (rng.random((n, 1)) < 0.4).astype(np.float32)
    sex = np.tile([1.0, 0.0], n // 2)
    noise = rng.random(n)
    probs = np.where(sex == 1, 0.8 * y[:, 0] + 0.2 * noise, noise)[:, None]  # learnt for men, chance for women
    groups = subgroups.image_groups(n, sex, np.full(n, 50.0), ["PA"] * n, "nih")
    sub = subgroups.subgroup_metrics(y, probs, None, ["A"], groups, None, draws=200)
    gap = sub["largest_gaps"]["A"]
    assert gap["attribute"] == "sex" and gap["groups"] == ["M", "F"] and gap["gap"] > 0.3
    assert gap["intervals_overlap"] is False


def test_sex_decoding_and_sources():
    assert list(subgroups.decode_sex(np.array([1.0, 0.0, np.nan]))) == ["M", "F", None]
    assert list(subgroups.decode_sex(pd.array([1, pd.NA, 0], dtype="Int8"))) == ["M", None, "F"]
    assert subgroups.source_name("nih", {"metadata": "Data_Entry_2017.csv"}) == "nih"
    assert subgroups.source_name("table", {"metadata": "/data/site-b/labels.csv"}) == "table:labels.csv"
    assert subgroups.source_name("dicom", {"metadata": None, "images": "/pacs/export"}) == "dicom:export"


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("subgroups")
    store = synthetic_store(root / "store", sizes={"train": 300, "val": 200, "test": 200}, signal=2.0, seed=5)
    out = root / "run"
    train.main(["--store", str(store), "--out", str(out), "--epochs", "3", "--batch-size", "64", "--threads", "1",
                "--quiet", "--bootstrap-draws", "100", "--age-bands", "30,60"])
    return store, out


def test_a_head_runs_predictions_say_who_each_image_is(head_run):
    store, out = head_run
    frame = pd.read_parquet(out / "predictions" / "test.parquet")
    assert list(frame.columns[:6]) == ["image_id", *rundir.FRONT_COLUMNS]
    rows = pd.read_parquet(store / "split=test").sort_values("image_id").reset_index(drop=True)
    assert list(frame["patient_id"]) == list(rows["patient_id"])
    assert list(frame["sex"]) == [{1: "M", 0: "F"}.get(v) if pd.notna(v) else None for v in rows["sex"]]
    np.testing.assert_allclose(frame["age"], rows["age"].astype(float))
    assert set(frame["view"]) == {"PA"} and set(frame["source"]) == {"nih"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["settings"]["age_bands"] == [30, 60]
    for split in ("val", "test"):
        sub = metrics["splits"][split]["subgroups"]
        assert set(sub) == {"sex", "age", "view", "source", "largest_gaps"}
        assert list(sub["age"])[:3] == ["<30", "30-60", "60+"]
        assert sum(g["n"] for g in sub["sex"].values()) == metrics["splits"][split]["n"]
    report = (out / "report.md").read_text()
    assert "## Subgroups (test split)" in report and "### By sex" in report and "### Largest gap per class" in report
    assert "nan" not in report.split("## Subgroups")[1].split("## ")[0]


def test_an_evaluation_carries_them_too(head_run, tmp_path):
    store, out = head_run
    evaluate.main(["--run", str(out), "--store", str(store), "--bootstrap-draws", "0", "--out", str(tmp_path / "ev")])
    frame = pd.read_parquet(tmp_path / "ev" / "predictions" / "test.parquet")
    assert list(frame.columns[:6]) == ["image_id", *rundir.FRONT_COLUMNS]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["splits"]["test"]["subgroups"]["sex"]["F"]["scored"]
    assert "## Subgroups (test split)" in (tmp_path / "ev" / "report.md").read_text()


def _strip_who(run, to):
    """A copy of `run` as a run from before predictions files said who each image is."""
    dest = rundir.prepare(to, overwrite=False, kind="head", log=lambda m: None)
    for name in (rundir.METRICS, rundir.CONFIG):
        (dest / name).write_text((run / name).read_text())
    for split in ("val", "test"):
        frame = pd.read_parquet(run / "predictions" / f"{split}.parquet").drop(columns=list(rundir.FRONT_COLUMNS))
        rundir.write_table(frame, dest / "predictions" / f"{split}.parquet")
    return dest


def test_ensembles_carry_the_members_columns_and_old_files_still_load(head_run, tmp_path):
    _, out = head_run
    old = _strip_who(out, tmp_path / "old")
    arrays = rundir.read_predictions(old / "predictions" / "test.parquet", json.loads((old / "metrics.json").read_text())["label_names"])
    assert arrays["patient_id"] is None and arrays["groups"] is None
    # An ensemble of an old run and a new one: the new one's columns, subgroups scored.
    ensemble.main([str(old), str(out), "--out", str(tmp_path / "mixed"), "--bootstrap-draws", "0"])
    frame = pd.read_parquet(tmp_path / "mixed" / "predictions" / "test.parquet")
    assert list(frame.columns[:6]) == ["image_id", *rundir.FRONT_COLUMNS]
    assert "subgroups" in json.loads((tmp_path / "mixed" / "metrics.json").read_text())["splits"]["test"]
    # Two old runs: no subgroups, a note that says why, and a report that renders.
    older = _strip_who(out, tmp_path / "older")
    ensemble.main([str(old), str(older), "--out", str(tmp_path / "old-ens"), "--bootstrap-draws", "0"])
    metrics = json.loads((tmp_path / "old-ens" / "metrics.json").read_text())
    assert "subgroups" not in metrics["splits"]["test"]
    assert any(n.startswith("test: no subgroups") for n in metrics["notes"])
    assert "## Subgroups" not in (tmp_path / "old-ens" / "report.md").read_text()


def test_an_ensemble_refuses_members_that_disagree_on_who_an_image_is(head_run, tmp_path, capsys):
    _, out = head_run
    other = _strip_who(out, tmp_path / "other")
    for split in ("val", "test"):
        path = other / "predictions" / f"{split}.parquet"
        frame = pd.read_parquet(path)
        who = pd.read_parquet(out / "predictions" / f"{split}.parquet")[list(rundir.FRONT_COLUMNS)]
        who.loc[0, "sex"] = "F" if who.loc[0, "sex"] != "F" else "M"
        rundir.write_table(pd.concat([frame[["image_id"]], who, frame.drop(columns="image_id")], axis=1), path)
    with pytest.raises(SystemExit):
        ensemble.cli([str(out), str(other), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "its val sex column differs" in err and err.count("\n") == 1
