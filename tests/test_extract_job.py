"""End to end: the Spark job over real NIH images, in local[2], with random weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.features.feature_stats import is_constant
from common.models.inference import FeatureExtractor
from common.data.labels import NIH_LABELS
from common.data.nih import read_nih
from common.features.store import StoreError, read_errors, read_manifest, read_split
from common.features.store_writer import OutputError
from jobs.extract import main
from tests.data_paths import NIH_CSV, NIH_IMAGES, REPO, needs_shared, write_nih_subset

pytestmark = needs_shared
BACKBONE = "mobilenet_v3_large"  # the fastest registry backbone on CPU
N_IMAGES = 30
CORRUPT = "00099999_000.png"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 real 1024-px NIH images (the RGBA ones among them), one truncated file, 2 absent images."""
    root = tmp_path_factory.mktemp("nih")
    names = sorted(os.listdir(NIH_IMAGES))
    picked = ["00000100_000.png", "00001369_000.png", *[n for n in names[::14] if n not in ("00000100_000.png", "00001369_000.png")]][:N_IMAGES]
    for i, name in enumerate(picked):  # Kaggle-style nested folders
        folder = root / "images" / f"images_{i % 3 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(NIH_IMAGES / name, folder / name)
    (root / "images" / CORRUPT).write_bytes((NIH_IMAGES / picked[0]).read_bytes()[:5000])
    absent = [n for n in names if n not in picked][:2]

    write_nih_subset(root, [*picked, *absent], CORRUPT, lists=True)
    return {"root": root, "picked": picked, "absent": absent}


def job_args(dataset, out, *extra):
    root = dataset["root"]
    return ["--dataset", "nih", "--metadata", str(root / "Data_Entry_2017_v2020.csv"),
            "--images", str(root / "images"), "--out", str(out), "--backbone", BACKBONE,
            "--weights", "random:0", "--val-fraction", "0.2", "--chunk-size", "8", "--images-per-task", "4",
            "--progress-interval", "1", *extra]


@pytest.fixture(scope="module")
def store(dataset, spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "nih-mobilenet"
    summary = main(job_args(dataset, out), spark=spark)
    return out, summary


def all_rows(out):
    return pa.concat_tables(pq.read_table(out / f"split={s}") for s in ("train", "val", "test")
                            if (out / f"split={s}").is_dir())


def test_store_has_every_contract_column_and_the_right_rows(store, dataset):
    out, summary = store
    table = all_rows(out)
    assert table.schema.field("image_id").type == pa.string()
    assert table.schema.field("patient_id").type == pa.string()
    assert table.schema.field("view").type == pa.string()
    assert table.schema.field("age").type == pa.float32()
    assert table.schema.field("sex").type == pa.int8()
    assert table.schema.field("labels").type.value_type == pa.int8()
    assert table.schema.field("features").type.value_type == pa.float32()
    assert sorted(table.column("image_id").to_pylist()) == sorted(dataset["picked"])

    meta = read_nih(NIH_CSV).table.set_index("image_id")
    manifest = read_manifest(out)
    for split in manifest["splits"]:
        data = read_split(out, split, manifest)
        assert data.features.shape == (len(data), manifest["feature_dim"]) and data.features.dtype == np.float32
        assert np.isfinite(data.features).all()
        for i, image_id in enumerate(data.image_id):
            row = meta.loc[image_id]
            assert np.array_equal(data.labels[i], row["labels"])
            assert data.age[i] == row["age"] and data.sex[i] == row["sex"] and data.view[i] == row["view"]
            assert data.patient_id[i] == row["patient_id"]
    per_patient = {}
    for split in manifest["splits"]:
        for p in read_split(out, split, manifest).patient_id:
            per_patient.setdefault(p, set()).add(split)
    assert all(len(s) == 1 for s in per_patient.values())
    # A few files per split, not one per task (there were 8 tasks per chunk, 4 chunks).
    assert sum(1 for _ in out.glob("split=*/*.parquet")) <= 3


def test_manifest_records_what_made_the_store(store, dataset):
    out, summary = store
    m = read_manifest(out)
    assert m["format_version"] == 1 and m["dataset"] == "nih"
    assert m["label_names"] == list(NIH_LABELS)
    assert m["backbone"] == BACKBONE and m["feature_dim"] == 1280
    assert m["weights"] == "random:0" and "random" in m["weights_note"]
    assert DataConfig.from_dict(m["data_config"]) == DataConfig(224)
    assert m["device"] == "cpu" and m["precision"] in ("fp32", "bf16") and m["precision_requested"] == "auto"
    stats = m["feature_stats"]
    assert {k: v["rows"] for k, v in stats.items()} == {k: v for k, v in m["splits"].items() if v}
    # Random MobileNet features are ~1e-10 everywhere: flagged as carrying nothing.
    assert all(is_constant(v) for v in stats.values())
    assert sum(m["splits"].values()) == N_IMAGES
    assert m["split_method"]["kind"] == "official" and m["split_method"]["val_fraction"] == 0.2
    assert m["errors"] == 1
    assert m["metadata_counts"]["images_missing"] == 2
    assert {"torch", "torchvision", "pyspark", "cxr-features"} <= set(m["software"])
    assert "--backbone " + BACKBONE in m["command"] and m["created"].endswith("+00:00")
    assert not (out / "_work").exists()


def test_unreadable_image_is_in_the_errors_table_and_the_job_went_on(store):
    out, _ = store
    errors = read_errors(out).to_pylist()
    assert [e["image_id"] for e in errors] == [CORRUPT]
    assert errors[0]["path"].endswith(CORRUPT) and errors[0]["error"].startswith("OSError")
    assert "\n" not in errors[0]["error"]


def test_features_belong_to_their_own_rows(store, dataset):
    """Features equal the backbone run directly on each row's image: no row gets another's vector."""
    out, _ = store
    data = read_split(out, "train")
    extractor = FeatureExtractor(BACKBONE, None, 0, threads=1)
    picks = data.image_id[:3]
    paths = [next((dataset["root"] / "images").rglob(name)) for name in picks]
    direct = extractor(np.stack([DataConfig(224).load(str(p)) for p in paths]))
    stored = data.features[:3]
    cosine = (direct * stored).sum(1) / np.linalg.norm(direct, axis=1) / np.linalg.norm(stored, axis=1)
    assert (cosine > 0.999).all(), cosine
    # ...and differ between images, so the check above can fail.
    assert np.corrcoef(stored)[0, 1] < 0.999


def test_complete_store_is_not_overwritten_without_the_flag(store, dataset, spark):
    out, _ = store
    before = (out / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="already here; pass --overwrite"):
        main(job_args(dataset, out), spark=spark)
    assert (out / "manifest.json").read_text() == before
    assert read_split(out, "train").features.shape[0] > 0


@pytest.mark.slow
def test_killed_run_restarts_without_redoing_committed_chunks(dataset, store, spark, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYSPARK_SUBMIT_ARGS": "--master local[2] pyspark-shell",
           "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable}
    log = (tmp_path / "first-run.log").open("w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "extract.py"), *job_args(dataset, out)],
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (out / "_work" / "chunk-00001.json").exists():
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "no chunk committed in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and the Python workers
    proc.wait()
    printed = (tmp_path / "first-run.log").read_text()
    assert "[extract] chunk 1/4 committed; " in printed and " images/s, 0 errors" in printed
    committed = sorted(p.name for p in (out / "_work").glob("chunk-?????.json"))
    assert 2 <= len(committed) < 4, committed
    with pytest.raises(StoreError, match="no manifest.json"):
        read_manifest(out)  # a killed run never looks complete

    # Had a committed chunk been embedded elsewhere (a GPU executor, fp16), the store is refused.
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    marker = mixed / "_work" / "chunk-00000.json"
    files = json.loads(marker.read_text())["files"]
    marker.write_text(json.dumps({"files": [{**f, "ran": "cuda/fp16"} for f in files]}))
    with pytest.raises(OutputError, match=r"different devices/precisions \(cpu/\w+: \d+ images, cuda/fp16: 8 images\)"):
        main(job_args(dataset, mixed), spark=spark)
    with pytest.raises(StoreError, match="no manifest.json"):
        read_manifest(mixed)

    summary = main(job_args(dataset, out), spark=spark)
    assert summary["images_processed"] == N_IMAGES + 1 - 8 * len(committed)  # only the rest was embedded
    table = all_rows(out)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES
    # The same rows as the uninterrupted run, feature for feature.
    clean = {r["image_id"]: r["features"] for r in all_rows(store[0]).to_pylist()}
    for row in table.to_pylist():
        assert np.allclose(row["features"], clean[row["image_id"]], atol=1e-3)
    assert read_manifest(out)["errors"] == 1


def test_masked_view_embeds_lung_masked_inputs_with_fraction_and_qa(dataset, spark, tmp_path):
    """--view masked: the lung model runs in the backbone's worker; features = masking + embedding done directly."""
    from lungs.masking import LungMasker
    from lungs.model import DEFAULT

    out, masks = tmp_path / "masked", tmp_path / "masks"
    main(job_args(dataset, out, "--view", "masked", "--limit", "10", "--precision", "fp32", "--save-masks", str(masks)),
         spark=spark)
    m = read_manifest(out)
    assert m["view"] == "masked" and m["lungs"]["label"] == "default" and len(m["lungs"]["sha256"]) == 64
    assert sum(m["lungs"]["qa_counts"].values()) == sum(m["splits"].values())
    assert m["lungs"]["masks_dir"] == str(masks.resolve())
    rows = all_rows(out).to_pylist()
    assert rows and all(0 < r["lung_fraction"] < 1 for r in rows)
    masker = LungMasker(str(DEFAULT))
    extractor = FeatureExtractor(BACKBONE, None, 0, precision="fp32", threads=1)
    picks = rows[:3]
    paths = [next((dataset["root"] / "images").rglob(r["image_id"])) for r in picks]
    cfg = DataConfig(224)
    images, views = zip(*(cfg.load_with(masker.view(cfg), str(p)) for p in paths))
    masked, columns = masker(np.stack(images), [r["image_id"] for r in picks], np.stack(views))
    np.testing.assert_allclose(columns["lung_fraction"], [r["lung_fraction"] for r in picks], rtol=1e-6)
    assert columns["lung_qa"] == [r["lung_qa"] for r in picks]
    direct = extractor(masked)
    stored = np.array([r["features"] for r in picks])
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
    # --save-masks: one 0/255 PNG per embedded image, named by its id, the mask the backbone saw.
    assert sorted(p.name for p in masks.iterdir()) == sorted(r["image_id"] for r in rows)
    for r in rows:
        saved = np.asarray(Image.open(masks / r["image_id"]))
        assert saved.shape == (224, 224) and set(np.unique(saved)) <= {0, 255}
        assert (saved == 255).mean() == pytest.approx(r["lung_fraction"], abs=1e-6)


@pytest.mark.slow
def test_masked_run_resumes_keeps_bad_images_and_refuses_other_settings(dataset, spark, tmp_path, monkeypatch):
    """A masked run stopped after two chunks resumes after them; the corrupt file is an error row with
    null lung columns; resuming it as an original-view run is refused."""
    import common.features.store_writer as store_writer

    out = tmp_path / "masked"
    real_commit, commits = store_writer.commit_chunk, []

    def crash_after_two(work, index, files):
        if len(commits) == 2:
            raise KeyboardInterrupt("stopped")  # what a ^C between chunks does
        commits.append(index)
        real_commit(work, index, files)

    monkeypatch.setattr(store_writer, "commit_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(job_args(dataset, out, "--view", "masked"), spark=spark)
    monkeypatch.setattr(store_writer, "commit_chunk", real_commit)
    with pytest.raises(OutputError, match="unfinished run with other inputs or settings"):
        main(job_args(dataset, out), spark=spark)  # the same images, but not masked
    summary = main(job_args(dataset, out, "--view", "masked"), spark=spark)
    assert summary["images_processed"] == N_IMAGES + 1 - 16
    m = read_manifest(out)
    assert m["errors"] == 1 and sum(m["lungs"]["qa_counts"].values()) == N_IMAGES
    rows = all_rows(out).to_pylist()
    assert len(rows) == N_IMAGES and all(0 < r["lung_fraction"] < 1 for r in rows)
    errors = read_errors(out)
    assert errors.column("image_id").to_pylist() == [CORRUPT]


def test_a_masked_run_says_so_counts_its_qa_flags_and_warns_when_many_masks_are_flagged(dataset, spark, tmp_path,
                                                                                         capsys):
    """The summary of a masked run names the view and its QA counts; every row's lung_qa is what the manifest counts
    ("ok", never null); a lung model that finds no lung flags every image and the summary warns."""
    from collections import Counter

    import torch

    from lungs.model import UNet, save_lung_model

    out = tmp_path / "masked"
    main(job_args(dataset, out, "--view", "masked", "--limit", "6", "--input-size", "64"), spark=spark)
    m, rows = read_manifest(out), all_rows(out).to_pylist()
    assert dict(Counter(r["lung_qa"] for r in rows)) == m["lungs"]["qa_counts"]
    assert m["lungs"]["qa_counts"].get("ok", 0) >= 5  # at 64 px the lung model still sees 256 px
    summary = capsys.readouterr().err.split("[extract] store complete", 1)[1]
    assert "lung-masked" in summary and "lung masks (QA): " in summary and "warning" not in summary

    blind = UNet(base=4, depth=2)  # a lung model that sees no lung anywhere
    torch.nn.init.zeros_(blind.head.weight)
    torch.nn.init.constant_(blind.head.bias, -10.0)
    save_lung_model(blind, {"size": 32, "base": 4, "depth": 2}, tmp_path / "blind.pt", data={}, metrics={})
    main(job_args(dataset, tmp_path / "blind", "--view", "masked", "--limit", "6", "--lung-model",
                  str(tmp_path / "blind.pt")), spark=spark)
    assert read_manifest(tmp_path / "blind")["lungs"]["qa_counts"] == {"empty": 6}
    summary = capsys.readouterr().err.split("[extract] store complete", 1)[1]
    assert "lung masks (QA): empty 6" in summary
    assert "warning: 6 of 6 lung masks (100%) are flagged" in summary


def test_save_masks_needs_the_masked_view(dataset, spark, tmp_path):
    with pytest.raises(ValueError, match="--save-masks: needs --view masked"):
        main(job_args(dataset, tmp_path / "s", "--save-masks", str(tmp_path / "m")), spark=spark)
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_original_masked_and_fused_stores_train_heads_and_compare(dataset, spark, tmp_path, capsys):
    """LeDNet's comparison on a real pair: original and lung-masked stores of the same NIH images,
    heads on each and on both fused (heads.train --store A B), one table side by side."""
    from heads import compare, train

    stores = {}
    for view in ("original", "masked"):
        stores[view] = tmp_path / view
        main(job_args(dataset, stores[view], "--view", view, "--backbone", "resnet50", "--input-size", "96",
                      "--chunk-size", "64", "--precision", "fp32"), spark=spark)
    runs = {}
    head = ["--head", "linear", "--epochs", "3", "--threads", "1", "--quiet", "--bootstrap-draws", "0"]
    for name, use in (("original", ["original"]), ("masked", ["masked"]), ("fused", ["original", "masked"])):
        runs[name] = tmp_path / "runs" / name
        train.main(["--store", *(str(stores[v]) for v in use), "--out", str(runs[name]), *head])
    fused = json.loads((runs["fused"] / "config.json").read_text())
    assert [s["view"] for s in fused["stores"]] == ["original", "masked"]
    assert fused["input_width"] == 2 * 2048
    summary = compare.main([*(str(runs[n]) for n in runs), "--out", str(tmp_path / "cmp")])
    table = pd.read_csv(summary["csv"])
    assert sorted(set(table["run"])) == ["fused", "masked", "original"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "resnet50 random:0 original + resnet50 random:0 masked" in md  # the features row says what was fused

    # The fused head on image files: each image is embedded as is and lung-masked by the store's own
    # lung model, so its probabilities are the ones the head gives the stored features.
    from heads import predict

    folder = tmp_path / "scans"
    folder.mkdir()
    picked = sorted(dataset["picked"])[:3]
    for name in picked:
        shutil.copy(next((dataset["root"] / "images").rglob(name)), folder / name)
    from_images = pd.read_csv(predict.main(["--run", str(runs["fused"]), "--images", str(folder), "--precision", "fp32",
                                            "--threads", "1", "--out", str(tmp_path / "images.csv")])).set_index("image_id")
    from_stores = pd.read_csv(predict.main(["--run", str(runs["fused"]), "--precision", "fp32", "--threads", "1",
                                            "--out", str(tmp_path / "stores.csv")])).set_index("image_id")
    labels = json.loads((runs["fused"] / "metrics.json").read_text())["label_names"]
    np.testing.assert_allclose(from_images.loc[picked, labels].to_numpy(), from_stores.loc[picked, labels].to_numpy(),
                               atol=1e-4)
    stored = {r["image_id"]: r["lung_fraction"] for r in all_rows(stores["masked"]).to_pylist()}
    np.testing.assert_allclose(from_images.loc[picked, "lung_fraction"], [stored[i] for i in picked], rtol=1e-6)

    # A head trained on masked features does not read an original-view store.
    with pytest.raises(SystemExit):
        predict.cli(["--run", str(runs["masked"]), "--store", str(stores["original"]), "--out", str(tmp_path / "x.csv")])
    assert "view 'original' differs from the head's store" in capsys.readouterr().err


def test_two_different_files_of_one_name_can_be_shipped_in_one_session(spark, tmp_path):
    """Spark refuses a second, different file under a name it already has; checkpoints are all best.pt."""
    from pyspark import SparkFiles

    from common.models.weights import file_sha256
    from jobs.extract import ship_file

    names = []
    for i in range(2):
        path = tmp_path / f"run{i}" / "best.pt"
        path.parent.mkdir()
        path.write_bytes(f"checkpoint {i}".encode())
        names.append(ship_file(spark, str(path), file_sha256(str(path))))
    assert names[0] != names[1] and all(n.endswith("-best.pt") for n in names)
    assert [open(SparkFiles.get(n), "rb").read() for n in names] == [b"checkpoint 0", b"checkpoint 1"]


def test_a_job_whose_lock_was_taken_commits_nothing_more(dataset, spark, tmp_path, monkeypatch):
    """An object store's lock can be lost to a job started in the same instant: the first job stops before committing."""
    import jobs.extract
    from common.runs.safe_output import OutputLock

    class Lost(OutputLock):
        lost = True

    monkeypatch.setattr(jobs.extract, "OutputLock", Lost)
    out = tmp_path / "lost"
    with pytest.raises(OutputError, match="another job took this store's lock, so this one stops"):
        main(job_args(dataset, out, "--limit", "4"), spark=spark)
    assert not list((out / "_work").glob("chunk-*.json")) and not (out / "manifest.json").exists()
