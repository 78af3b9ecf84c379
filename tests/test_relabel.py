"""Labels aligned across datasets: the alias table, and an NIH-trained head scored on a CheXpert store.

The CheXpert-style store carries the NIH store's planted signal (feature c shifted when NIH label c
is positive) for the pathologies both datasets have, so the shared labels must score well above
chance; NIH-only labels have no ground truth there and must be listed as not scored, never scored
against zeros.
"""

import json

import numpy as np
import pandas as pd
import pytest

from common.data.labels import CHEXPERT_LABELS, NIH_LABELS, canonical, relabel, shared_labels
from heads import compare, evaluate, train
from tests.heads_fixtures import synthetic_rows, synthetic_store, write_store

FAST = ["--epochs", "30", "--batch-size", "64", "--threads", "1", "--quiet"]
DIM = 32
SHARED = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
          "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema"}
NIH_ONLY = {"Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"}


def test_aliases_are_true_synonyms_only():
    assert canonical("Pleural Effusion") == canonical("Effusion") == "Effusion"
    assert canonical("pleural thickening") == "Pleural_Thickening"  # spelling only
    assert canonical("Pleural Other") != canonical("Pleural_Thickening")
    assert canonical("Lung Lesion") not in (canonical("Mass"), canonical("Nodule"))
    assert canonical("Lung Opacity") != canonical("Infiltration")
    assert canonical("Enlarged Cardiomediastinum") != canonical("Cardiomegaly")
    assert canonical("Tuberculosis") == "Tuberculosis"  # unknown names are their own
    assert dict(shared_labels(NIH_LABELS, CHEXPERT_LABELS)) == SHARED
    # "No Finding" means "none of this dataset's findings": paired within one dataset only.
    assert shared_labels(["No Finding"], CHEXPERT_LABELS) == []
    assert shared_labels(["No Finding"], CHEXPERT_LABELS, same_dataset=True) == [("No Finding", "No Finding")]


def test_relabel_by_hand():
    labels = np.array([[1, 0, -1, 1],
                       [0, -1, 1, 0]], dtype=np.int8)
    got = relabel(labels, ["Pleural Effusion", "Cardiomegaly", "Edema", "Fracture"],
                  ["Effusion", "Edema", "Hernia", "Cardiomegaly"])
    expected = np.array([[1, -1, np.nan, 0],
                         [0, 1, np.nan, -1]])
    np.testing.assert_array_equal(got, expected)  # NaN where absent (never 0), -1 kept, aliases applied
    assert got.dtype == np.float64


def _chexpert_rows(n: int, rng: np.random.Generator, split: str) -> dict:
    """CheXpert labels (some uncertain), features shifted at each shared label's NIH column."""
    rows = synthetic_rows(n, DIM, len(CHEXPERT_LABELS), rng, signal=0.0, uncertain=0.1, prefix=split)
    labels = rows["labels"]
    for nih, chexpert in SHARED.items():
        rows["features"][:, NIH_LABELS.index(nih)] += 2.5 * (labels[:, CHEXPERT_LABELS.index(chexpert)] == 1)
    # CheXpert's patient/study layout, so the store is also scored per study.
    rows["image_id"] = [f"{split}/patient{i // 4:05d}/study{i // 2 % 2 + 1}/view{i % 2 + 1}_frontal.jpg"
                        for i in range(n)]
    rows["patient_id"] = [f"patient{i // 4:05d}" for i in range(n)]
    return rows


@pytest.fixture(scope="module")
def nih_on_chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("relabel")
    nih = synthetic_store(root / "nih", dim=DIM, signal=2.5, seed=1)
    rng = np.random.default_rng(5)
    chexpert = write_store(root / "chexpert", {s: _chexpert_rows(n, rng, s) for s, n in (("val", 200), ("test", 400))},
                           label_names=CHEXPERT_LABELS, dataset="chexpert")
    head_run = root / "nih-head"
    train.main(["--store", str(nih), "--out", str(head_run), *FAST])
    out = root / "nih-on-chexpert"
    summary = evaluate.main(["--run", str(head_run), "--store", str(chexpert), "--split", "val", "test",
                             "--bootstrap-draws", "200", "--out", str(out)])
    return {"root": root, "nih": nih, "chexpert": chexpert, "head": head_run, "out": out, "summary": summary}


def test_shared_labels_score_and_nih_only_labels_are_not_scored(nih_on_chexpert):
    out = nih_on_chexpert["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_names"] == list(SHARED)
    assert dict(map(tuple, metrics["aliases"])) == SHARED
    assert set(metrics["not_scored"]) == NIH_ONLY
    assert {"Lung Opacity", "Lung Lesion", "Pleural Other", "Fracture"} <= set(metrics["store_labels_unused"])
    test = metrics["splits"]["test"]
    assert set(test["per_class"]) == set(SHARED)  # no AUROC computed for Hernia, Fibrosis, ... against zeros
    for name, entry in test["per_class"].items():
        assert entry["auroc"] > 0.85, (name, entry["auroc"])
        assert entry["auroc_ci_low"] <= entry["auroc"] <= entry["auroc_ci_high"]
    assert test["summary"]["mean_auc"] > 0.85
    assert test["study_level"]["studies"] == 200
    assert json.loads((out / ".cxr-run.json").read_text())["kind"] == "evaluation"
    text = (out / "report.md").read_text()
    assert "| Effusion | Pleural Effusion |" in text and "Hernia" in text


def test_uncertain_labels_are_not_scored(nih_on_chexpert):
    from common.features.store import read_split

    test = read_split(nih_on_chexpert["chexpert"], "test")
    metrics = json.loads((nih_on_chexpert["out"] / "metrics.json").read_text())
    predictions = pd.read_parquet(nih_on_chexpert["out"] / "predictions" / "test.parquet")
    assert (predictions["image_id"].to_numpy() == test.image_id).all()
    for nih, chexpert in SHARED.items():
        column = test.labels[:, CHEXPERT_LABELS.index(chexpert)]
        entry = metrics["splits"]["test"]["per_class"][nih]
        assert (column == -1).any()
        assert entry["n_pos"] + entry["n_neg"] == int((column != -1).sum())
        assert entry["n_pos"] == int((column == 1).sum())
        np.testing.assert_array_equal(predictions[f"label:{nih}"].to_numpy(), column)  # -1 stays "not scored"
    assert not any(c in predictions for c in ("Hernia", "label:Hernia"))


def test_refusals(nih_on_chexpert, tmp_path, capsys):
    head, chexpert = str(nih_on_chexpert["head"]), str(nih_on_chexpert["chexpert"])

    def refused(*argv):
        with pytest.raises(SystemExit) as exit_:
            evaluate.cli(["--run", head, *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("heads.evaluate: error: ") and err.count("\n") == 1
        return err

    assert "a run is already here; pass --overwrite" in refused("--store", chexpert, "--out", str(nih_on_chexpert["out"]))
    rng = np.random.default_rng(0)
    other_features = write_store(tmp_path / "densenet", {"test": synthetic_rows(40, DIM, 14, rng)}, backbone="densenet121")
    assert "backbone" in refused("--store", str(other_features), "--out", str(tmp_path / "a"))
    nothing_shared = write_store(tmp_path / "fractures", {"test": synthetic_rows(40, DIM, 2, rng)},
                                 label_names=("Fracture", "Support Devices"), dataset="table")
    assert "--store" in refused("--store", str(nothing_shared), "--out", str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before --out was made


def test_overwrite_and_own_dataset(nih_on_chexpert, tmp_path):
    """On its own store the head is scored on every label, as its run was; `cxr compare` sets them side by side."""
    out = nih_on_chexpert["out"].with_name("nih-on-nih")
    for extra in ([], ["--overwrite"]):
        evaluate.main(["--run", str(nih_on_chexpert["head"]), "--bootstrap-draws", "0", "--out", str(out), *extra])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_names"] == list(NIH_LABELS) and metrics["not_scored"] == []
    head_metrics = json.loads((nih_on_chexpert["head"] / "metrics.json").read_text())
    assert metrics["splits"]["test"]["summary"]["mean_auc"] == pytest.approx(
        head_metrics["splits"]["test"]["summary"]["mean_auc"])
    compare.main([str(nih_on_chexpert["head"]), str(out), "--out", str(tmp_path / "cmp")])
    assert "| kind | head | evaluation |" in (tmp_path / "cmp" / "comparison.md").read_text()
