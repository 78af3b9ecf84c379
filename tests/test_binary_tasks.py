"""A binary task (one 0/1 label, as tuberculosis screening) from a user's own table, end to end: head and
fine-tune runs, their reports, model cards, compare and ensembles show one AUROC with its interval, never a
"mean" over one class; and a trained run scored on another hospital's labelled table of image files in one
command (heads.evaluate --images), unreadable images counted, never fatal."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.runs import rundir
from heads import compare, ensemble, evaluate, predict, train
from jobs import fine_tune
from tests.heads_fixtures import synthetic_rows, write_store
from tests.test_dicom import write_dicom

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABEL = "Tuberculosis"
BACKBONE, DIM = "mobilenet_v3_large", 1280  # the registry's fastest backbone
FAST = ["--epochs", "3", "--threads", "1", "--quiet", "--bootstrap-draws", "200"]
TABLE = ["--dataset", "table", "--path-column", "file", "--patient-column", "patient", "--label-columns", LABEL]
MEAN_WORDING = ("mean AUROC", "**mean**", "mean D-AUC", "macro F1", "W-AUC", "The mean has no DeLong test")


def _store(root):
    rng = np.random.default_rng(0)
    splits = {s: synthetic_rows(n, DIM, 1, rng, signal=2.0, prevalence=0.5, prefix=s)
              for s, n in {"train": 120, "val": 60, "test": 60}.items()}
    return write_store(root / "store", splits, label_names=[LABEL], dataset="table", backbone=BACKBONE,
                       weights="random:0", manifest_extra={"data_config": DataConfig(64).to_dict()})


def _hospital(root, n: int = 30):
    """Another hospital: its own table and folder, images of other sizes and formats (PNG, JPEG, DICOM, a
    1,800 px film), one unreadable."""
    folder = root / "other" / "films"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        name = f"site_{i:03d}.{'dcm' if i == 5 else 'jpg' if i % 3 == 0 else 'png'}"
        h, w = (1800, 1500) if i == 7 else (96, 80) if i % 2 else (72, 120)  # a full-size film among small ones
        if i == 5:  # a 12-bit MONOCHROME1 DICOM, as a DX export writes it
            write_dicom(folder / name, rng.integers(0, 4096, (600, 512), dtype=np.uint16), "MONOCHROME1", 12)
        else:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / name)
        rows.append({"file": name, "patient": f"P{i // 2}", LABEL: (i // 2) % 2})
    (folder / "broken.png").write_bytes(b"not an image")
    rows.append({"file": "broken.png", "patient": "P99", LABEL: 1})
    table = root / "other" / "labels.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table, folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    store = _store(root)
    for name, head in (("mlp", "mlp3"), ("linear", "linear")):
        train.main(["--store", str(store), "--out", str(root / name), "--head", head, "--calibrate", "temperature",
                    *FAST])
    return root


def _no_mean_wording(text: str) -> None:
    for wording in MEAN_WORDING:
        assert wording not in text, wording


def test_a_head_runs_report_and_card_show_one_auroc_with_its_interval(runs):
    report = (runs / "mlp" / rundir.REPORT).read_text()
    _no_mean_wording(report)
    summary = report.split("## Summary")[1].split("##")[0]
    assert "| split | images | AUROC | AUPRC | F1@0.5 | F1@val thr |" in summary
    metrics = rundir.read_json(runs / "mlp" / rundir.METRICS)
    test = metrics["splits"]["test"]["per_class"][LABEL]
    assert f"{test['auroc']:.3f} ({test['auroc_ci_low']:.2f}-{test['auroc_ci_high']:.2f})" in summary
    # D-AUC and N-AUC need findings besides the label: said once, not a column of dashes or a note per split.
    assert "D-AUC" not in summary and "are not shown: no negative here has another finding" in report
    assert "no negatives with another disease" not in report and "Pooled:" not in report
    card = (runs / "mlp" / rundir.MODEL_CARD).read_text()
    _no_mean_wording(card)
    assert f"- AUROC {test['auroc']:.3f}, 95% CI" in card


def test_compare_and_ensemble_of_binary_runs_have_no_mean_row(runs):
    out = runs / "compared"
    compare.main([str(runs / "mlp"), str(runs / "linear"), "--out", str(out), "--bootstrap-draws", "200"])
    text = (out / "comparison.md").read_text()
    _no_mean_wording(text)
    assert f"| {LABEL} | " in text and "Multiple comparisons" not in text  # one test: no Holm note
    ensemble.main([str(runs / "mlp"), str(runs / "linear"), "--out", str(runs / "ens"),
                   "--bootstrap-draws", "200"])
    _no_mean_wording((runs / "ens" / rundir.REPORT).read_text())


def test_an_uncertainty_policy_on_a_table_of_zeros_and_ones_trains_quietly(runs, capsys):
    train.main(["--store", str(runs / "store"), "--out", str(runs / "ones"), "--policy", "ones", *FAST])
    assert "warning" not in capsys.readouterr().err.lower()
    _no_mean_wording((runs / "ones" / rundir.REPORT).read_text())


def test_a_head_run_is_scored_on_another_hospitals_table_in_one_command(runs):
    table, folder = _hospital(runs)
    out = runs / "other-hospital"
    summary = evaluate.main(["--run", str(runs / "mlp"), "--metadata", str(table), "--images", str(folder), *TABLE,
                             "--threads", "1", "--bootstrap-draws", "200", "--out", str(out)])
    metrics = rundir.read_json(out / rundir.METRICS)
    assert metrics["images"] == {"table": metrics["images"]["table"], "scored": 30, "unreadable": 1}
    errors = pd.read_csv(out / rundir.ERRORS)
    assert list(errors["image_id"]) == ["broken.png"] and errors["error"].iloc[0]
    test = metrics["splits"]["test"]
    assert test["n"] == 30 and test["per_class"][LABEL]["n_pos"] == 14 and "calibration" in test
    assert "operating_points" in test and summary["test_scored"] == 1
    # The same images through heads.predict give the same probabilities (one model, one data config).
    scored = pd.read_parquet(out / rundir.PREDICTIONS / "test.parquet")
    assert list(scored.columns[:2]) == ["image_id", "patient_id"]
    predicted = pd.read_parquet(predict.main(["--run", str(runs / "mlp"), "--images", str(folder), "--threads", "1",
                                              "--out", str(runs / "p.parquet")]))
    raw = predict_raw(runs / "mlp", predicted)
    got = scored.set_index("image_id")[LABEL]
    np.testing.assert_allclose(got.to_numpy(), raw.loc[got.index].to_numpy(), rtol=1e-4, atol=1e-6)
    report = (out / rundir.REPORT).read_text()
    _no_mean_wording(report)
    assert "30 scored, 1 could not be scored (errors.csv)" in report and "| Tuberculosis | Tuberculosis | 14 / 16 |" in report
    config = rundir.read_json(out / rundir.CONFIG)
    assert config["kind"] == "evaluation" and config["model_kind"] == "head" and config["stores"]
    # Two evaluations on the same table compare as any runs.
    evaluate.main(["--run", str(runs / "linear"), "--metadata", str(table), "--images", str(folder), *TABLE,
                   "--threads", "1", "--bootstrap-draws", "0", "--out", str(runs / "other-linear")])
    compare.main([str(out), str(runs / "other-linear"), "--out", str(runs / "other-compared"),
                  "--bootstrap-draws", "0"])
    assert "other-linear − other-hospital" in (runs / "other-compared" / "comparison.md").read_text()


def predict_raw(run, predicted: pd.DataFrame) -> pd.Series:
    """heads.predict applies the run's temperature; the evaluation's predictions file keeps raw ones."""
    from common.evaluation.calibration import apply_temperature, read_calibration, temperatures

    probs = predicted.set_index("image_id")[[LABEL]].dropna()
    t = temperatures(read_calibration(run), [LABEL])
    # Undo sigmoid(logit(p) / T): logit(raw) = T * logit(p).
    p = probs.to_numpy(dtype=np.float64)
    raw = 1 / (1 + np.exp(-t * np.log(p / (1 - p))))
    assert np.allclose(apply_temperature(raw, t), p, atol=1e-6)
    return pd.Series(raw[:, 0], index=probs.index)


def test_refusals_of_the_images_route_are_one_line(runs, capsys):
    table, folder = runs / "other" / "labels.csv", runs / "other" / "films"
    cases = [(["--metadata", str(table)], "--metadata: only with --images"),
             (["--metadata", str(table), "--images", str(folder), *TABLE, "--store", str(runs / "store")],
              "--store and --images"),
             (["--metadata", str(table), "--images", str(folder), *TABLE, "--split", "val"], "--split: not with --images"),
             (["--metadata", str(table), "--images", str(folder), "--dataset", "table", "--path-column", "file",
               "--patient-column", "patient", "--label-columns", "Cardiomegaly"], "Cardiomegaly")]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            evaluate.cli(["--run", str(runs / "mlp"), "--out", str(runs / "refused"), *extra])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (runs / "refused").exists()


def test_a_finetune_run_on_a_binary_table_is_scored_elsewhere_the_same_way(runs, tmp_path, capsys):
    table, folder = _hospital(tmp_path)
    out = tmp_path / "ft"
    fine_tune.main(["--metadata", str(table), "--images", str(folder), *TABLE, "--out", str(out),
                    "--backbone", BACKBONE, "--weights", "random:0", "--input-size", "64", "--batch-size", "8",
                    "--epochs", "1", "--threads", "1", "--num-workers", "0", "--split", "ratios",
                    "--split-ratios", "0.5,0.25,0.25"])
    _no_mean_wording((out / rundir.REPORT).read_text())
    other = tmp_path / "ft-elsewhere"
    evaluate.main(["--run", str(out), "--metadata", str(table), "--images", str(folder), *TABLE, "--threads", "1",
                   "--bootstrap-draws", "0", "--out", str(other)])
    metrics = rundir.read_json(other / rundir.METRICS)
    config = rundir.read_json(other / rundir.CONFIG)
    assert config["model_kind"] == "finetune" and config["data_config"]["input_size"] == 64
    assert metrics["splits"]["test"]["n"] == 30 and metrics["images"]["unreadable"] == 1
    assert json.loads(json.dumps(metrics["thresholds"])) == {LABEL: pytest.approx(
        rundir.read_json(out / rundir.METRICS)["thresholds"][LABEL])}
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a fine-tune run has no store to be scored on
        evaluate.cli(["--run", str(out), "--out", str(tmp_path / "no-store")])
    assert "a fine-tune run has no store; score it on image files" in capsys.readouterr().err


@pytest.mark.browser
def test_the_page_answers_a_one_finding_model_in_one_line(tmp_path, capsys):
    import urllib.request

    from tests.data_paths import NIH_IMAGES
    from tests.serve_fixtures import LiveServer
    from tests.test_serve_browser import _browser_or_skip, _launch

    _browser_or_skip()
    if not NIH_IMAGES.is_dir():
        pytest.skip("shared NIH images not found")
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    dim = 2048  # resnet50: its random features differ between images, so the probability is the image's own
    splits = {s: synthetic_rows(n, dim, 1, rng, signal=1.0, prevalence=0.5, prefix=s)
              for s, n in {"train": 60, "val": 30}.items()}
    store = write_store(tmp_path / "store", splits, label_names=[LABEL], dataset="table", backbone="resnet50",
                        weights="random:0", manifest_extra={"data_config": DataConfig(64).to_dict()})
    train.main(["--store", str(store), "--out", str(tmp_path / "run"), "--epochs", "2", "--threads", "1", "--quiet"])
    live = LiveServer(tmp_path / "run")
    image = sorted(NIH_IMAGES.glob("*.png"))[0]
    request = urllib.request.Request(f"{live.url}/api/predict", data=image.read_bytes(),
                                     headers={"Content-Type": "image/png"})
    expected = json.loads(urllib.request.urlopen(request, timeout=60).read())["findings"][0]
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page()
                page.goto(live.url + "/")
                page.wait_for_function("document.querySelectorAll('#model dd').length > 0")
                model_text = page.inner_text("#model")
                page.set_input_files("#file", str(image))
                page.wait_for_selector("#verdict:not([hidden])", timeout=60_000)
                verdict = page.inner_text("#verdict")
                table_shown = page.is_visible("#findings")
            finally:
                browser.close()
    finally:
        live.close()
    assert "val AUROC" in model_text and "mean AUROC" not in model_text and LABEL in model_text
    call = "positive" if expected["above_threshold"] else "negative"
    assert verdict.startswith(f"{LABEL}: {call} (probability {expected['probability']:.4f}") and not table_shown
