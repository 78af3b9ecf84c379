"""The diagnosis API in-process (Flask's test client), over a head run and a fine-tune run.

Probabilities must equal heads.predict --images for the same file; every bad upload is a 4xx with one
line of reason, and the next request is still answered.
"""

import io
import json
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from heads import predict
from serve.app import Settings, create_app
from serve.batcher import Batcher
from serve.model import ModelError, load_served
from tests.data_paths import NIH_IMAGES, needs_shared
from tests.serve_fixtures import SIZE, finetune_run, head_run

pytestmark = [needs_shared, pytest.mark.usefixtures("one_torch_thread")]
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def pngs():
    out = []
    for path in sorted(NIH_IMAGES.glob("*.png")):
        with Image.open(path) as img:
            if img.mode == "L":
                out.append(path)
        if len(out) == 4:
            return out


@pytest.fixture(scope="module")
def head(tmp_path_factory, one_torch_thread):
    run = head_run(tmp_path_factory.mktemp("serve-head"))
    served = load_served(run, precision="fp32", threads=1)
    batcher = Batcher(served.predict, max_batch=8, wait_ms=30)
    app = create_app(served, batcher, Settings(max_upload_mb=2, max_pixels=1100 * 1100))
    yield run, served, app.test_client()
    batcher.close()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, one_torch_thread):
    run = finetune_run(tmp_path_factory.mktemp("serve-ft"))
    served = load_served(run, threads=1)
    batcher = Batcher(served.predict, max_batch=4, wait_ms=5)
    yield run, served, create_app(served, batcher).test_client()
    batcher.close()


def dicom_of(png) -> bytes:
    """The PNG's pixels as an 8-bit MONOCHROME1 DICOM (inverted), in memory."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage

    with Image.open(png) as img:
        gray = np.asarray(img)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.Modality = SecondaryCaptureImageStorage, "DX"
    ds.set_pixel_data(255 - gray, "MONOCHROME1", 8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def post(client, data: bytes, name="x.png", query="", **kwargs):
    return client.post(f"/api/predict{query}", data={"file": (io.BytesIO(data), name)},
                       content_type="multipart/form-data", **kwargs)


def test_probabilities_equal_heads_predict_for_the_same_files(head, pngs, tmp_path):
    run, served, client = head
    folder = tmp_path / "scans"
    folder.mkdir()
    for png in pngs:
        (folder / png.name).write_bytes(png.read_bytes())
    (folder / "as.dcm").write_bytes(dicom_of(pngs[0]))
    expected = pd.read_parquet(predict.main(["--run", str(run), "--images", str(folder), "--precision", "fp32",
                                             "--threads", "1", "--out", str(tmp_path / "p.parquet")]))
    expected = expected.set_index("image_id")[served.label_names]
    for name in [*(p.name for p in pngs), "as.dcm"]:
        response = post(client, (folder / name).read_bytes(), name)
        assert response.status_code == 200, response.json
        got = response.json
        probs = np.array([got["probabilities"][n] for n in served.label_names])
        np.testing.assert_allclose(probs, expected.loc[name].to_numpy(dtype=float), rtol=1e-4, atol=1e-6)
        assert [f["probability"] for f in got["findings"]] == sorted(probs.tolist(), reverse=True)
        for f in got["findings"]:
            assert f["threshold"] == got["thresholds"][f["name"]]
            assert f["above_threshold"] == (f["probability"] >= f["threshold"])
    # Distinct images get distinct answers, so the equality above can fail.
    assert not np.allclose(expected.iloc[0].to_numpy(dtype=float), expected.iloc[1].to_numpy(dtype=float))
    # The raw-body form and the multipart form give one answer.
    raw = client.post("/api/predict?name=a.png", data=pngs[0].read_bytes(), content_type="image/png").json
    assert raw["probabilities"] == post(client, pngs[0].read_bytes()).json["probabilities"]


def test_a_dicom_under_an_image_name_or_content_type_is_diagnosed(head, pngs):
    _, _, client = head
    dicom = dicom_of(pngs[0])
    expected = post(client, dicom, "as.dcm").json["probabilities"]
    named_png = post(client, dicom, "x.png")  # Pillow refuses it first: its marker is still found
    assert named_png.status_code == 200, named_png.json
    raw = client.post("/api/predict?name=x.jpg&preview=1", data=dicom, content_type="image/jpeg")
    assert raw.status_code == 200, raw.json
    assert named_png.json["probabilities"] == raw.json["probabilities"] == expected


def test_model_health_and_the_head_has_no_heatmap(head, pngs):
    _, served, client = head
    model = client.get("/api/model").json
    assert model["kind"] == "head" and model["backbone"] == "resnet50" and model["has_cam"] is False
    assert "not a medical device" in model["notice"] and set(model["thresholds"]) == set(served.label_names)
    assert "test_mean_auroc" in model and model["training_data"].startswith("nih")
    answer = post(client, pngs[0].read_bytes(), query="?preview=1&cam=all").json
    assert "cam" not in answer and "no spatial map" in answer["cam_note"]
    assert answer["preview"].startswith("data:image/png;base64,")
    health = client.get("/api/health").json
    assert health["status"] == "ok" and health["images"] >= 1


def _bad_uploads(png: bytes) -> list[tuple[str, dict, int, str]]:
    from pydicom.dataset import Dataset, FileMetaDataset

    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = pydicom.uid.generate_uid()
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    big = io.BytesIO()
    Image.fromarray(np.zeros((1200, 1200), np.uint8)).save(big, format="PNG")  # over max_pixels, tiny file
    multipart = lambda data, name="x.png": {"data": {"file": (io.BytesIO(data), name)},  # noqa: E731
                                            "content_type": "multipart/form-data"}
    return [
        ("empty body", {}, 400, "empty body"),
        ("empty file", multipart(b""), 400, "empty upload"),
        ("no file field", {"data": {"other": "1"}, "content_type": "multipart/form-data"}, 400, "field 'file'"),
        ("text body", {"data": b"hello", "content_type": "text/plain"}, 415, "not an image upload"),
        ("json body", {"data": b"{}", "content_type": "application/json"}, 415, "not an image upload"),
        ("not an image", multipart(b"GIF? no: plain bytes " * 20, "notes.png"), 422, "cannot read the upload"),
        ("truncated png", multipart(png[:4000]), 422, "cannot read the upload"),
        ("dicom without pixels", multipart(buf.getvalue(), "sr.dcm"), 422, "no pixel data"),
        ("decompression bomb", multipart(big.getvalue()), 422, "Mpixel"),
        ("too large", multipart(b"\0" * (3 * 1024 * 1024)), 413, "--max-upload-mb"),
        # Werkzeug raises its 413 for these too, though the bodies are well under --max-upload-mb.
        ("form field over 500 KB", {"data": {"file": (io.BytesIO(png), "x.png"), "note": "n" * 600_000},
                                    "content_type": "multipart/form-data"}, 400, "form field"),
        ("boundary not in the body", {"data": png[:8] + b"\1" * 600_000,
                                      "headers": {"Content-Type": "multipart/form-data; boundary=abc"}},
         400, "malformed multipart body"),
        ("no boundary in the type", {"data": png, "content_type": "multipart/form-data"}, 400, "boundary"),
        ("hostile name", multipart(b"junk", "../../etc/passwd\x07.png"), 422, "passwd"),
    ]


def test_bad_uploads_are_one_line_4xx_and_the_next_request_is_served(head, pngs):
    _, _, client = head
    good = pngs[1].read_bytes()
    for name, kwargs, status, words in _bad_uploads(good):
        response = client.post("/api/predict", **kwargs)
        assert response.status_code == status, (name, response.status_code, response.data[:200])
        error = response.json["error"]
        assert words in error and "\n" not in error and len(error) <= 300, (name, error)
        assert "/etc" not in error and "\x07" not in error  # a client's path is never echoed as a path
        assert post(client, good).status_code == 200, name


def test_concurrent_requests_share_forward_passes(head, pngs):
    _, served, client = head
    before = client.get("/api/health").json
    data = [p.read_bytes() for p in pngs] * 3
    answers = [None] * len(data)

    def ask(i):
        answers[i] = post(client, data[i]).json

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = client.get("/api/health").json
    assert after["images"] - before["images"] == len(data)
    assert after["batches"] - before["batches"] < len(data)  # some requests shared a batch
    assert max(a["batch_size"] for a in answers) > 1
    for i, a in enumerate(answers):  # a batch neighbour never changes an answer
        alone = answers[i % len(pngs)]
        np.testing.assert_allclose([a["probabilities"][n] for n in served.label_names],
                                   [alone["probabilities"][n] for n in served.label_names], rtol=1e-4, atol=1e-6)


def test_uploads_are_kept_only_when_asked_under_their_hash(head, pngs, tmp_path):
    import hashlib

    _, served, _ = head
    batcher = Batcher(served.predict)
    client = create_app(served, batcher, Settings(keep_uploads=str(tmp_path))).test_client()
    data = pngs[0].read_bytes()
    answer = post(client, data, "../../evil.png").json
    assert answer["kept_as"] == hashlib.sha256(data).hexdigest() + ".bin"
    assert [p.name for p in tmp_path.iterdir()] == [answer["kept_as"]]
    assert (tmp_path / answer["kept_as"]).read_bytes() == data
    batcher.close()


def test_an_upload_that_cannot_be_kept_still_gets_its_diagnosis(head, pngs, tmp_path, caplog):
    """--keep-uploads is a side effect: a folder gone read-only or replaced by a file is logged in one
    line, and the answer the model computed is still given."""
    _, served, client = head
    folder = tmp_path / "kept"
    folder.write_text("a file where the folder was")
    batcher = Batcher(served.predict)
    try:
        keeping = create_app(served, batcher, Settings(keep_uploads=str(folder))).test_client()
        with caplog.at_level("WARNING"):
            response = post(keeping, pngs[0].read_bytes())
    finally:
        batcher.close()
    assert response.status_code == 200, response.json
    assert response.json["probabilities"] == post(client, pngs[0].read_bytes()).json["probabilities"]
    assert response.json["kept_as"] is None and "Not a directory" in response.json["keep_error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--keep-uploads" in warnings[0] and "\n" not in warnings[0]
    assert not any(r.exc_info for r in caplog.records)


def test_finetune_run_answers_with_class_activation_maps(finetuned, pngs):
    run, served, client = finetuned
    answer = post(client, pngs[0].read_bytes(), query="?cam=all&preview=1").json
    names = served.label_names
    assert answer["model"]["kind"] == "finetune" and set(answer["cam"]["maps"]) == set(names)
    w, h = answer["cam"]["grid"]
    assert (w, h) == (64, 64)  # square NIH film: the long side is the grid's
    some = np.array(answer["cam"]["maps"][names[0]])
    assert some.shape == (h, w) and some.min() == 0 and some.max() == 1
    # The probabilities are the checkpoint's own on the data config's input.
    from finetune.checkpoint import load_classifier

    model, obj = load_classifier(run / "best.pt")
    config = DataConfig.from_dict(obj["data_config"])
    assert config.input_size == SIZE
    import torch

    with torch.no_grad():
        direct = torch.sigmoid(model(config.to_tensor(config.load(str(pngs[0]))[None]))).numpy()[0]
    np.testing.assert_allclose([answer["probabilities"][n] for n in names], direct, rtol=1e-4, atol=1e-6)
    one = post(client, pngs[0].read_bytes(), query=f"?cam={names[2]}").json
    assert list(one["cam"]["maps"]) == [names[2]]
    bad = post(client, pngs[0].read_bytes(), query="?cam=Nonsense")
    assert bad.status_code == 400 and "not a finding" in bad.json["error"]
    thresholds = json.loads((run / "metrics.json").read_text())["thresholds"]
    assert answer["thresholds"] == pytest.approx(thresholds)


def test_the_model_says_n_interval_threshold_sources_and_warnings(head, pngs):
    run, served, client = head
    model = client.get("/api/model").json
    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["splits"]["val"]  # the fixture's store has no test split: the page must say val, not test
    assert model["test"]["split"] == "val" and model["test"]["n"] == val["n"] == 30
    assert model["test"]["ci_low"] == val["summary"]["mean_auc_ci_low"]
    assert model["test"]["interval"].startswith("95% CI")
    kinds = [w["kind"] for w in model["warnings"]]
    assert "random_weights" in kinds and "no_test" in kinds  # a random ResNet-50's features, no test split
    assert set(model["threshold_sources"]) == set(served.label_names)
    assert model["calibration"].startswith("raw") and "chosen on the run's val split" in model["thresholds_note"]
    card = client.get("/api/model-card").json
    assert card["card"]["warnings"] == model["warnings"]
    assert "**WARNING: random weights" in card["markdown"] and "## Training data" in card["markdown"]
    answer = post(client, pngs[0].read_bytes()).json
    assert all(f["threshold_source"] == model["threshold_sources"][f["name"]] for f in answer["findings"])
    assert answer["calibration"] == model["calibration"]


def test_a_calibrated_run_answers_calibrated_probabilities_and_a_chance_banner(head, pngs, tmp_path):
    import shutil

    from common.evaluation.calibration import apply_temperature, write_calibration
    from serve.model import CALIBRATED

    run, served, client = head
    copy = tmp_path / "calibrated"
    shutil.copytree(run, copy)
    temperature = np.linspace(0.5, 2.5, len(served.label_names))
    write_calibration(copy, served.label_names, temperature)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["splits"]["val"]["summary"] |= {"mean_auc": 0.53, "mean_auc_ci_low": 0.41, "mean_auc_ci_high": 0.66}
    (copy / "metrics.json").write_text(json.dumps(metrics))
    calibrated = load_served(copy, precision="fp32", threads=1)
    batcher = Batcher(calibrated.predict, max_batch=4, wait_ms=5)
    try:
        other = create_app(calibrated, batcher).test_client()
        model = other.get("/api/model").json
        assert model["calibration"] == CALIBRATED and "chance" in [w["kind"] for w in model["warnings"]]
        chance = next(w["text"] for w in model["warnings"] if w["kind"] == "chance")
        assert "0.530 (95% CI 0.41-0.66, 30 images): the interval contains 0.5" in chance
        np.testing.assert_allclose(calibrated.thresholds, apply_temperature(served.thresholds, temperature))
        raw = post(client, pngs[0].read_bytes()).json["probabilities"]
        got = post(other, pngs[0].read_bytes()).json
        names = served.label_names
        expected = apply_temperature(np.array([raw[n] for n in names]), temperature)
        np.testing.assert_allclose([got["probabilities"][n] for n in names], expected, rtol=1e-4, atol=1e-6)
        assert got["calibration"] == CALIBRATED
        for f in got["findings"]:
            assert f["above_threshold"] == (f["probability"] >= f["threshold"])
    finally:
        batcher.close()


def test_a_finetune_run_from_random_weights_warns_and_applies_its_calibration(finetuned, pngs):
    from common.evaluation.calibration import apply_temperature, write_calibration
    from finetune.predictor import FinetuneOnImages

    run, served, client = finetuned
    model = client.get("/api/model").json
    weights = [w["text"] for w in model["warnings"] if w["kind"] == "random_weights"]
    assert weights and "fine-tuned from scratch" in weights[0]
    card = json.loads((run / "model_card.json").read_text())  # written by the run itself
    assert card["run"]["kind"] == "finetune" and card["model"]["file"] == "best.pt"
    assert card["training_data"]["prevalence"]["train"] and "**WARNING: random weights" in (run / "model_card.md").read_text()
    names = served.label_names
    temperature = np.full(len(names), 2.0)
    raw = post(client, pngs[0].read_bytes()).json["probabilities"]
    write_calibration(run, names, temperature)
    try:
        predictor = FinetuneOnImages.from_run(run)
        source = io.BytesIO(pngs[0].read_bytes())
        inputs, error = predictor.decode(source)
        got = predictor.predict([inputs], ["a.png"]).probs[0]
    finally:
        (run / "calibration.json").unlink()
    np.testing.assert_allclose(got, apply_temperature(np.array([raw[n] for n in names]), temperature),
                               rtol=1e-4, atol=1e-6)


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a run directory"):
        load_served(tmp_path)


def test_a_head_on_a_lung_masked_store_shows_what_the_model_saw(tmp_path, pngs, one_torch_thread):
    """A masked store's head masks uploads with the store's own lung model (checked by sha256) and the
    answer carries the masked input, the lung fraction and the QA flags, as the store has them."""
    from common.models.weights import file_sha256
    from heads import train
    from lungs.model import DEFAULT
    from tests.heads_fixtures import synthetic_rows, write_store
    from tests.serve_fixtures import BACKBONE

    rng = np.random.default_rng(0)
    splits = {s: synthetic_rows(n, 2048, 14, rng, signal=1.0, prefix=s) for s, n in {"train": 40, "val": 20}.items()}
    store = write_store(tmp_path / "masked", splits, backbone=BACKBONE, manifest_extra={
        "data_config": DataConfig(224).to_dict(), "view": "masked",
        "lungs": {"label": "default", "sha256": file_sha256(str(DEFAULT)), "size": 256}})
    train.main(["--store", str(store), "--out", str(tmp_path / "run"), "--epochs", "1", "--threads", "1", "--quiet"])
    served = load_served(tmp_path / "run", precision="fp32", threads=1)
    batcher = Batcher(served.predict)
    try:
        answer = post(create_app(served, batcher).test_client(), pngs[0].read_bytes(), query="?preview=1").json
    finally:
        batcher.close()
    assert answer["model"]["view"] == "masked" and answer["masked_input"].startswith("data:image/png;base64,")
    assert 0.1 < answer["lung_fraction"] < 0.6 and "lung_qa" in answer
    masked = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(answer["masked_input"].split(",")[1]))))
    assert masked.shape == (224, 224) and (masked == 0).mean() > 0.3  # outside the lungs is black


def test_a_model_failure_is_a_json_500_and_the_service_goes_on(head, pngs):
    _, served, _ = head
    calls = []

    def flaky(inputs, ids):
        calls.append(len(inputs))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return served.predict(inputs, ids)

    batcher = Batcher(flaky)
    client = create_app(served, batcher).test_client()
    try:
        first = post(client, pngs[0].read_bytes())
        second = post(client, pngs[0].read_bytes())
    finally:
        batcher.close()
    assert first.status_code == 500 and "CUDA out of memory (simulated)" in first.json["error"]
    assert second.status_code == 200 and len(second.json["findings"]) == len(served.label_names)


def test_a_busy_port_is_refused_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import socket

    import serve.__main__ as serve_main

    def build(args):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(serve_main, "build", build)
    with socket.create_server(("127.0.0.1", 0)) as busy:  # listening: the port is taken
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            serve_main.cli(["--run", str(tmp_path), "--port", str(port)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err and "in use" in err, err


@pytest.mark.parametrize("flag, value, other", [("--port", "70000", "--wait-ms"), ("--wait-ms", "-1", "--port")])
def test_a_range_error_names_only_its_flag(tmp_path, capsys, flag, value, other):
    from serve.__main__ import cli as main

    with pytest.raises(SystemExit) as stopped:
        main(["--run", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"{flag} {value}" in err and other not in err, err


def test_a_large_upload_is_never_spooled_to_disk(head, monkeypatch):
    import tempfile

    _, _, client = head
    spooled = []
    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: spooled.append(1) or real(*a, **k))
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000), dtype=np.uint8)  # 1 MB: over 500 KB
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > 900_000  # Werkzeug spools file parts over 500 KB
    response = post(client, buf.getvalue())
    assert response.status_code == 200, response.json
    assert spooled == []
