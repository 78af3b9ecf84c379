"""Model cards of head and ensemble runs, their warnings, calibrated predictions, and undefined values as "—"."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from common.evaluation import model_card
from common.evaluation.calibration import apply_temperature, write_calibration
from common.evaluation.text import UNDEFINED, number, with_interval
from common.runs import rundir
from heads import ensemble, evaluate, predict, report, train
from heads.predictions import run_temperature
from tests.heads_fixtures import synthetic_rows, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--epochs", "15", "--batch-size", "64", "--threads", "1", "--quiet"]
SHA = "ab" * 32
NAN = re.compile(r"\bnan\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two heads on the same images: one on verified ImageNet features, one on a random backbone's; val has no
    Hernia positive, so its threshold is the 0.5 fallback."""
    root = tmp_path_factory.mktemp("cards")
    rng = np.random.default_rng(0)
    splits = {s: synthetic_rows(n, 32, 14, rng, signal=2.5, prefix=s) for s, n in
              (("train", 300), ("val", 150), ("test", 150))}
    splits["val"]["labels"][:, 13] = 0
    verified = write_store(root / "store-imagenet", splits, weights="imagenet:IMAGENET1K_V2",
                           manifest_extra={"weights_sha256": SHA})
    random = write_store(root / "store-random", splits, weights="random:0")
    out = {}
    for name, store in (("imagenet", verified), ("random", random)):
        train.main(["--store", str(store), "--out", str(root / name), *FAST])
        out[name] = root / name
    return out


def test_a_head_run_card_has_every_section(runs):
    run = runs["imagenet"]
    card = json.loads((run / rundir.MODEL_CARD_JSON).read_text())
    text = (run / rundir.MODEL_CARD).read_text()
    assert card["format"] == model_card.CARD_FORMAT and card["run"]["kind"] == "head"
    assert card["warnings"] == []  # verified weights, a test interval well above 0.5
    (weights,) = card["weights"]
    assert weights["status"] == "verified" and weights["sha256"] == SHA and weights["backbone"] == "resnet50"
    data = card["training_data"]
    assert data["dataset"] == "nih" and data["images"] == {"train": 300, "val": 150, "test": 150}
    assert list(data["prevalence"]) == ["train", "val", "test"]
    assert data["prevalence"]["val"]["Hernia"] == {"positives": 0, "scored": 150, "prevalence": 0.0}
    metrics = json.loads((run / rundir.METRICS).read_text())
    test = metrics["splits"]["test"]
    assert card["test"]["n"] == 150 and card["test"]["mean_auroc"] == test["summary"]["mean_auc"]
    assert card["test"]["mean_auroc_ci_low"] == test["summary"]["mean_auc_ci_low"] > 0.5
    assert card["thresholds"]["fallback_0.5"] == ["Hernia"] and metrics["thresholds"]["Hernia"] == 0.5
    assert card["model"]["file"] == "head.pt" and len(card["model"]["sha256"]) == 64
    for heading in ("## Model", "## Weights provenance", "## Training data", "## Thresholds", "## Test metrics",
                    "## Calibration", "## Subgroups", "## Intended use"):
        assert heading in text, heading
    assert "not a medical device" in text and "WARNING" not in text
    assert "0.5 fallback, not chosen (val had no positive): Hernia" in text
    low, high = test["summary"]["mean_auc_ci_low"], test["summary"]["mean_auc_ci_high"]
    assert f"95% CI {low:.3f}-{high:.3f} (patient-level bootstrap, 1000 draws)" in text
    train_hernia = card["training_data"]["prevalence"]["train"]["Hernia"]
    assert train_hernia["scored"] == 300 and 0 < train_hernia["positives"] < 300
    # The run's report links its card and labels the fallback threshold where it stands.
    report_text = (run / rundir.REPORT).read_text()
    assert f"[{rundir.MODEL_CARD}]({rundir.MODEL_CARD})" in report_text
    assert "0.500 (0.5 fallback: no val positive)" in report_text


def test_random_weights_are_a_bold_warning(runs):
    card = model_card.build_card(runs["random"])
    assert [w["kind"] for w in card["warnings"]][:1] == ["random_weights"]
    assert card["weights"][0]["status"] == "random"
    text = (runs["random"] / rundir.MODEL_CARD).read_text()
    assert "**WARNING: random weights: resnet50 was never trained (random:0)" in text
    assert "| **RANDOM** |" in text


def test_cxr_report_rewrites_the_card(runs):
    run = runs["imagenet"]
    (run / rundir.MODEL_CARD).unlink()
    (run / rundir.MODEL_CARD_JSON).unlink()
    report.main(["--run", str(run)])
    assert (run / rundir.MODEL_CARD).is_file() and (run / rundir.MODEL_CARD_JSON).is_file()


def test_an_ensemble_run_has_a_card_with_its_members_weights(runs, tmp_path):
    out = tmp_path / "ens"
    ensemble.main([str(runs["imagenet"]), str(runs["random"]), "--out", str(out), "--bootstrap-draws", "0"])
    card = json.loads((out / rundir.MODEL_CARD_JSON).read_text())
    assert card["run"]["kind"] == "ensemble" and len(card["model"]["members"]) == 2
    assert [w["status"] for w in card["weights"]] == ["verified", "random"]
    assert "random_weights" in [w["kind"] for w in card["warnings"]]
    text = (out / rundir.MODEL_CARD).read_text()
    assert "## Weights provenance" in text and "member imagenet" in text and "**WARNING: random weights" in text
    # No interval (--bootstrap-draws 0) but 150 test images: no small-test warning, and the card says so.
    assert "no interval (bootstrap off)" in text and "small_test" not in [w["kind"] for w in card["warnings"]]
    assert "| 0.500 (0.5 fallback: no val positive) |" in (out / rundir.REPORT).read_text()
    report.main(["--run", str(out)])  # re-rendered by cxr report, the card too
    assert json.loads((out / rundir.MODEL_CARD_JSON).read_text())["weights"] == card["weights"]


def _split(n: int, mean: float, low: float | None, high: float | None) -> dict:
    return {"n": n, "summary": {"mean_auc": mean, "mean_auc_ci_low": low, "mean_auc_ci_high": high}}


def test_headline_warnings():
    kinds = lambda split, m: [w["kind"] for w in model_card.headline_warnings(split, m)]  # noqa: E731
    assert kinds("test", _split(500, 0.81, 0.78, 0.84)) == []
    assert kinds("test", _split(500, 0.55, 0.48, 0.61)) == ["chance"]
    assert kinds("test", _split(6, 0.758, None, None)) == ["small_test"]
    assert kinds("test", _split(6, math.nan, None, None)) == ["chance"]
    assert kinds("val", _split(500, 0.81, 0.78, 0.84)) == ["no_test"]
    assert kinds(None, None) == ["no_test"]
    text = model_card.headline_warnings("test", _split(40, 0.512, 0.43, 0.6))[0]["text"]
    assert "0.512 (95% CI 0.43-0.60, 40 images): the interval contains 0.5" in text


def test_weights_status():
    assert model_card.weights_entry("resnet50", "imagenet:IMAGENET1K_V2", SHA, "x")["warning"] is None
    unverified = model_card.weights_entry("densenet121", "checkpoint:/w.pt", None, "store s")
    assert unverified["status"] == "unverified" and "no sha256 on record" in unverified["warning"]
    scratch = model_card.weights_entry("densenet121", "random:3", None, "this run", trained_whole=True)
    assert scratch["status"] == "random" and "fine-tuned from scratch" in scratch["warning"]
    assert model_card.weights_entry("?", None, None, "member m (gone)")["status"] == "unknown"


def test_predict_gives_calibrated_probabilities_when_the_run_has_a_calibration(runs, tmp_path):
    run = runs["imagenet"]
    names = json.loads((run / rundir.METRICS).read_text())["label_names"]
    store = json.loads((run / rundir.CONFIG).read_text())["stores"][0]["path"]
    argv = ["--run", str(run), "--store", store, "--split", "test", "--precision", "fp32"]
    raw = pd.read_parquet(predict.main([*argv, "--out", str(tmp_path / "raw.parquet")]))
    temperature = np.linspace(0.5, 3.0, len(names))
    write_calibration(run, names, temperature)
    try:
        np.testing.assert_allclose(run_temperature(run, names), temperature)
        np.testing.assert_allclose(run_temperature(run / "head.pt", names), temperature)
        got = pd.read_parquet(predict.main([*argv, "--out", str(tmp_path / "cal.parquet")]))
        expected = apply_temperature(raw[names].to_numpy(np.float64), temperature)
        np.testing.assert_allclose(got[names].to_numpy(np.float64), expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got[names].to_numpy(), raw[names].to_numpy(), atol=1e-3)
        card = model_card.build_card(run)
        assert card["calibration"]["temperature"]["Hernia"] == pytest.approx(3.0)
        assert "temperature scaling fitted on val" in model_card.card_markdown(card)
    finally:
        (run / rundir.CALIBRATION).unlink()
    assert run_temperature(run, names) is None


def test_undefined_values_render_as_a_dash():
    assert number(math.nan) == number(None) == with_interval(None, 0.4, 0.6) == UNDEFINED
    assert with_interval(0.8123, 0.74, 0.88) == "0.812 (0.74-0.88)" and with_interval(0.8, None, 0.9) == "0.800"
    entry = {"auroc": math.nan, "n_pos": 0, "n_neg": 5}
    split = {"n": 5, "summary": {"mean_auc": math.nan}, "per_class": {"Hernia": entry}, "notes": []}
    metrics = {"label_names": ["Hernia"], "members": [{"path": "a", "kind": "head", "test_mean_auc": math.nan}],
               "combine": "prob", "thresholds": {"Hernia": 0.5}, "splits": {"test": split}, "notes": []}
    text = ensemble.render_report(metrics)
    # One label: its AUROC is the result, not a "mean" over one class.
    assert not NAN.search(text) and "| Hernia | — |" in text and "AUROC —" in text and "mean AUROC" not in text
    metrics |= {"head_dataset": "nih", "store_dataset": "chexpert", "aliases": [["Hernia", "Hernia"]],
                "not_scored": [], "store_labels_unused": []}
    text = evaluate.render_report({"head_run": "r", "stores": []}, metrics)
    assert not NAN.search(text) and "| Hernia | Hernia | 0 / 5 | — |" in text


def test_scored_counts_count_only_classes_with_an_auroc():
    per_class = {n: {"auroc": a} for n, a in (("A", 0.7), ("B", math.nan), ("C", None), ("D", 0.6))}
    metrics = {"label_names": list(per_class), "splits": {"test": {"per_class": per_class}}}
    assert evaluate.scored_counts(metrics) == {"test_scored": 2, "test_unscorable": 2}
