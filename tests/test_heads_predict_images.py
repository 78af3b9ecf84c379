"""heads.predict on a folder of images: features from the store's backbone, then the head."""

import os
import stat

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.models.inference import FeatureExtractor
from heads import predict, predictions, train
from heads.checkpoint import load_head
from tests.heads_fixtures import synthetic_rows, write_store

BACKBONE, DIM = "mobilenet_v3_large", 1280  # the registry's fastest backbone


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("images"), DataConfig(224))


def _trained(root, data_config):
    rng = np.random.default_rng(0)
    splits = {s: synthetic_rows(n, DIM, 14, rng, signal=1.0, prefix=s) for s, n in {"train": 60, "val": 30}.items()}
    store = write_store(root / "store", splits, backbone=BACKBONE, weights="random:0",
                        manifest_extra={"data_config": data_config.to_dict()})
    out = root / "run"
    train.main(["--store", str(store), "--out", str(out), "--epochs", "2", "--threads", "1", "--quiet"])
    return root, out


@pytest.fixture(scope="module")
def run_64_crop(tmp_path_factory):
    # A store extracted at a non-default input (e.g. from a 64 px fine-tune checkpoint).
    return _trained(tmp_path_factory.mktemp("images64"), DataConfig(64, resize="crop"))


@pytest.mark.parametrize("which", ["run", "run_64_crop"])
def test_folder_predictions_equal_head_on_extracted_features(which, request):
    root, out = request.getfixturevalue(which)
    data_config = DataConfig.from_dict(load_head(out).stores[0]["data_config"])
    folder = root / "scans"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.png", "sub/b.png", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (80, 64), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    path = predict.main(["--run", str(out), "--images", str(folder), "--precision", "fp32", "--threads", "1",
                         "--out", str(root / "p.parquet")])
    got = pd.read_parquet(path)
    assert list(got["image_id"]) == ["a.png", "broken.png", "c.jpg", "sub/b.png"]
    broken = got[got["image_id"] == "broken.png"].iloc[0]
    assert broken["error"] and np.isnan(broken["Atelectasis"])

    head = load_head(out)
    good = got[got["error"].isna()]
    extractor = FeatureExtractor(BACKBONE, None, 0, precision="fp32", threads=1, data_config=data_config)
    features = extractor(np.stack([data_config.load(str(folder / i)) for i in good["image_id"]]))
    nan = np.full(len(good), np.nan, dtype=np.float32)
    expected = predictions.probabilities(head, features, nan, nan, "fp32")
    np.testing.assert_allclose(good[head.label_names].to_numpy(), expected, rtol=1e-4, atol=1e-6)


def test_folder_refused_for_a_head_with_age_and_sex(run, tmp_path, capsys):
    root, _ = run
    out = tmp_path / "run"
    train.main(["--store", str(root / "store"), "--out", str(out), "--epochs", "1", "--age-sex", "--threads", "1",
                "--quiet"])
    with pytest.raises(SystemExit):
        predict.cli(["--run", str(out), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")])
    assert "age and sex" in capsys.readouterr().err


def test_folder_images_get_the_stores_own_input(run_64_crop, monkeypatch):
    # Random-weight features are tiny, so equal probabilities alone would not show the geometry: look at the input.
    root, out = run_64_crop
    folder = root / "wide"
    folder.mkdir()
    img = np.zeros((60, 180), np.uint8)
    img[:, 60:120] = 255  # white center square: the 'crop' input is all white
    Image.fromarray(img).save(folder / "w.png")
    seen = []
    original = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, images: seen.append(images) or original(self, images))
    predict.main(["--run", str(out), "--images", str(folder), "--threads", "1", "--out", str(root / "w.csv")])
    assert seen[0].shape == (1, 64, 64) and seen[0][:, :, 2:-2].min() > 0.99  # not padded, not 224


def test_every_image_named_entry_gets_a_row_and_a_fifo_is_never_opened(run, monkeypatch, capsys):
    root, out = run
    folder = root / "odd"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.full((40, 100), 128, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(folder / "sub" / "b.bmp")
    os.mkfifo(folder / "fifo.png")  # opening it for reading would block until a writer comes: forever
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.symlink("self.png", folder / "self.png")  # a link to itself
    os.symlink(".", folder / "sub" / "loop")  # a folder loop: walked once
    (folder / "scan.dcm").write_bytes(b"DICM")  # in the list, not a DICOM file: an error row, not skipped
    (folder / "README.txt").write_text("notes")
    loaded = []
    load = DataConfig.load

    def spy(self, path, max_pixels):
        assert not stat.S_ISFIFO(os.stat(path).st_mode), f"opened the FIFO {path}"
        loaded.append((os.path.basename(path), max_pixels))
        return load(self, path, max_pixels=max_pixels)

    monkeypatch.setattr(DataConfig, "load", spy)
    path = predict.main(["--run", str(out), "--images", str(folder), "--threads", "1", "--max-pixels", "2000",
                         "--out", str(root / "odd.csv")])
    got = pd.read_csv(path).set_index("image_id")
    assert list(got.index) == ["a.png", "dangling.png", "fifo.png", "scan.dcm", "self.png", "sub/b.bmp"]
    error = got["error"]
    assert error["dangling.png"] == "skipped: dangling symlink" and error["fifo.png"] == "skipped: not a regular file"
    assert error["self.png"] == "skipped: too many levels of symbolic links"
    assert error["scan.dcm"].startswith("ValueError: ") and "not a DICOM file" in error["scan.dcm"]
    assert "more than the limit of 0.002 Mpixel (--max-pixels)" in error["a.png"]  # 100 x 40 px; 40 x 40 is fine
    assert pd.isna(error["sub/b.bmp"]) and not got.loc["sub/b.bmp", head_labels(out)].isna().any()
    assert got.loc["fifo.png", head_labels(out)].isna().all()
    assert got.loc["dangling.png", "path"] == str(folder.resolve() / "dangling.png")  # the link, not its target
    assert sorted(loaded) == [("a.png", 2000), ("b.bmp", 2000), ("scan.dcm", 2000)]
    assert "1 files without an image suffix" in capsys.readouterr().err and "README.txt" not in got.index


def head_labels(run_dir):
    return list(load_head(run_dir).label_names)


def test_a_named_file_that_is_no_image_file_is_refused(run, tmp_path, capsys):
    _, out = run
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "notes.txt").write_text("x")
    for name, message in [("fifo.png", "not a regular file"), ("notes.txt", "not an image suffix"),
                          ("absent.png", "no such file or directory")]:
        with pytest.raises(SystemExit):
            predict.cli(["--run", str(out), "--images", str(tmp_path / name), "--out", str(tmp_path / "p.csv")])
        assert f"--images {tmp_path / name}: {message}" in capsys.readouterr().err


def test_non_finite_features_are_an_error_row_not_nan_probabilities(run, monkeypatch, tmp_path):
    root, out = run
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (40, 40), 90).save(folder / name)
    original = FeatureExtractor.__call__

    def nan_first(self, images):
        features = original(self, images)
        features[0, 5] = np.nan
        return features

    monkeypatch.setattr(FeatureExtractor, "__call__", nan_first)
    got = pd.read_csv(predict.main(["--run", str(out), "--images", str(folder), "--threads", "1",
                                    "--out", str(tmp_path / "p.csv")]))
    a, b = got.set_index("image_id").loc["a.png"], got.set_index("image_id").loc["b.png"]
    assert "non-finite features" in a["error"] and np.isnan(a["Atelectasis"])
    assert pd.isna(b["error"]) and np.isfinite(b["Atelectasis"])
