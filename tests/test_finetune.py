"""The fine-tuning job end to end on real NIH images, at 64 px with random DenseNet-121 weights.

DenseNet-121 because it is the faster of it and ResNet-50 at 64 px on this CPU (a training step
of 8 images: ~0.11 s against ~0.16 s) and CheXNet's backbone. One thread per process: tiny
convolutions on two threads slow to a crawl while other processes hold the cores.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from common.models.backbones import build_classifier
from common.models.inference import build_extractor
from common.models.weights import resolve_weights
from common.data.bboxes import read_nih_bboxes
from common.config import ConfigError
from finetune.checkpoint import load_classifier, state_sha256
from finetune.config import BEST, LAST, NOT_IDENTITY, FinetuneConfig, FinetuneError, SplitImages, identity_of
from finetune.loop import train
from finetune.sampler import EpochSampler
from finetune.settings import FINE_TUNING, FROM_SCRATCH, resolve_defaults
from finetune.dataset import ImageDataset
from finetune.decode_cache import DEFAULT_DIR as DECODE_CACHE
from common.images.data_config import DataConfig
from common.features.store import read_manifest, read_split
from common.runs import rundir
from finetune.localization import IOBB_THRESHOLDS, IOU_THRESHOLDS
from heads import predict as heads_predict, train as heads_train
from jobs import extract
from jobs import fine_tune as job
from tests.data_paths import NIH, NIH_CSV, NIH_IMAGES, needs_shared, write_nih_subset

BBOX_CSV = NIH / "BBox_List_2017.csv"
CORRUPT = "00099999_000.png"
# Two epochs of 3 steps of 8 over the 24 train images; lr 1e-3 so random weights fit them fast.
FAST = ["--backbone", "densenet121", "--weights", "random:0", "--input-size", "64", "--batch-size", "8",
        "--epochs", "2", "--lr", "1e-3", "--threads", "1", "--num-workers", "2", "--log-every", "1",
        "--split", "ratios", "--split-ratios", "0.6,0.2,0.2", "--early-stop-patience", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nih40(tmp_path_factory):
    """40 real 1024-px NIH images, the nine with radiologist boxes among them, and one truncated file."""
    if not NIH_CSV.is_file():
        pytest.skip("shared NIH data not found")
    root = tmp_path_factory.mktemp("nih40")
    (root / "images").mkdir()
    boxed = set(read_nih_bboxes(BBOX_CSV)["image_id"])
    names = sorted(os.listdir(NIH_IMAGES))
    picked = [n for n in names if n in boxed] + [n for n in names if n not in boxed][::13]
    picked = picked[:39]
    for name in picked:
        shutil.copy(NIH_IMAGES / name, root / "images" / name)
    (root / "images" / CORRUPT).write_bytes((NIH_IMAGES / picked[0]).read_bytes()[:4000])
    write_nih_subset(root, picked, CORRUPT, csv_name="meta.csv")
    return root


def job_args(data, out, *extra):
    return ["--dataset", "nih", "--metadata", str(data / "meta.csv"), "--images", str(data / "images"),
            "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def run(nih40, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ft"
    result = job.main(job_args(nih40, out, "--bbox-list", str(BBOX_CSV), "--overlays", "2", "--localize-split", "train"))
    return out, result


# --- pure parts ---------------------------------------------------------------------------------


def test_sampler_shards_cover_every_image_once_per_epoch_with_equal_steps():
    n, world, batch = 23, 3, 4
    shards = [EpochSampler(n, batch, world, rank, seed=5) for rank in range(world)]
    for s in shards:
        s.set_epoch(2)
    got = [s.indices() for s in shards]
    assert {len(g) for g in got} == {8} and {s.steps_per_epoch for s in shards} == {2}
    assert set(np.concatenate(got)) == set(range(n))  # 24 slots: one image twice (the padding)
    again = EpochSampler(n, batch, world, 1, seed=5)
    again.set_epoch(2)
    assert np.array_equal(again.indices(), got[1])
    again.set_epoch(3)
    assert not np.array_equal(again.indices(), got[1])
    again.set_epoch(2, start_step=1)
    assert np.array_equal(again.indices(), got[1][batch:]) and len(again) == 4


@needs_shared
def test_dataset_crops_flips_and_survives_an_unreadable_file(tmp_path):
    path = str(sorted(NIH_IMAGES.glob("*.png"))[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    y = np.array([[1, 0], [0, 1]], np.float32)
    m = np.ones((2, 2), bool)
    size = 32
    cfg = DataConfig(size)
    eval_ds = ImageDataset([path, str(bad)], y, m, cfg, train=False)
    x, targets, mask, ok, i = eval_ds[0]
    full = cfg.load(path)  # the eval item is the model's input as its data config builds it
    assert x.shape == (3, size, size) and ok and i == 0 and torch.equal(x, cfg.to_tensor(full[None])[0])
    assert torch.equal(targets, torch.tensor([1.0, 0.0])) and torch.equal(mask, torch.ones(2))
    x, _, _, ok, i = eval_ds[1]
    assert not ok and i == 1 and torch.equal(x, torch.zeros(3, size, size))

    train_ds = ImageDataset([path] * 40, np.zeros((40, 2)), np.ones((40, 2)), cfg, train=True, seed=1)
    crops = [train_ds[k][0] for k in range(40)]
    for k, got in enumerate(crops):
        # The view of item k in epoch 0 comes from (seed 1, epoch 0, k) alone, on the eval input.
        view = cfg.train_view(full, np.random.default_rng([1, 0, k]))
        assert torch.equal(got, cfg.to_tensor(view[None])[0])
    assert len({c.sum().item() for c in crops}) > 20
    assert torch.equal(train_ds[7][0], crops[7])
    train_ds.epoch = 1
    assert not torch.equal(train_ds[7][0], crops[7])


def test_frozen_backbone_trains_only_the_classifier(nih40, tmp_path, capfd):
    images = sorted((nih40 / "images").glob("0000*.png"))[:12]
    k = 3
    rng = np.random.default_rng(0)

    def split(paths):
        return SplitImages([p.name for p in paths], [str(p) for p in paths],
                           rng.integers(0, 2, (len(paths), k)).astype(np.float32), np.ones((len(paths), k), bool))

    cfg = FinetuneConfig(out=str(tmp_path), backbone="densenet121", label_names=["a", "b", "c"],
                         train=split(images[:8]), val=split(images[8:]), data_config=DataConfig(64), freeze_backbone=True,
                         lr=1e-2, batch_size=4, epochs=1, num_workers=0, threads=1, log_every=0, loss="bce",
                         log_seconds=1e-9)
    result = train(cfg)
    # No step count asked for, but a slow epoch still reports progress, by time.
    assert "epoch 1/1  step 1/2" in capfd.readouterr().err
    assert result["stopped"] == "epochs" and result["global_step"] == 2
    before = build_classifier(cfg.backbone, None, cfg.init_seed, len(cfg.label_names)).state_dict()
    after = torch.load(tmp_path / LAST, weights_only=True)["model_state"]
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"classifier.weight", "classifier.bias"}  # BatchNorm statistics untouched too


def test_a_saved_scheduler_state_loads_only_into_a_scheduler_of_its_type(nih40, tmp_path):
    images = sorted((nih40 / "images").glob("0000*.png"))[:8]

    def split(paths):
        return SplitImages([p.name for p in paths], [str(p) for p in paths], np.ones((4, 1), np.float32),
                           np.ones((4, 1), bool))

    cfg = FinetuneConfig(out=str(tmp_path), backbone="densenet121", label_names=["a"], train=split(images[:4]),
                         val=split(images[4:]), data_config=DataConfig(64), freeze_backbone=True, batch_size=4,
                         epochs=1, schedule="step", num_workers=0, threads=1, log_every=0, loss="bce",
                         stop_after_steps=1)
    assert train(cfg)["stopped"] == "interrupted"
    assert torch.load(tmp_path / LAST, weights_only=True)["scheduler"]["type"] == "StepLR"
    # Untyped, StepLR's state would load into ReduceLROnPlateau without a word (load_state_dict updates __dict__).
    with pytest.raises(FinetuneError, match=r"last\.pt: holds StepLR scheduler state, this run's scheduler is "
                                            r"ReduceLROnPlateau"):
        train(dataclasses.replace(cfg, schedule="plateau", stop_after_steps=None))


def test_the_resume_identity_is_every_training_field_but_epochs_and_io():
    ids, paths = ["a.png", "b.png"], ["/x/a.png", "/x/b.png"]
    split = SplitImages(ids, paths, np.ones((2, 1), np.float32), np.ones((2, 1), bool))
    cfg = FinetuneConfig(out="runs/a", backbone="densenet121", label_names=["a"], train=split, val=split)
    base = identity_of(cfg, policy="ignore")
    assert set(base) == {f.name for f in dataclasses.fields(cfg)} - NOT_IDENTITY | {"policy"}
    assert identity_of(dataclasses.replace(cfg, epochs=99, out="runs/b", log_every=1, device="cuda",
                                           num_workers=7, threads=3), policy="ignore") == base
    for change in ({"lr": 1e-3}, {"betas": (0.5, 0.9)}, {"schedule": "step"}, {"lr_factor": 0.5},
                   {"plateau_patience": 4}, {"focal_alpha": 0.25}, {"data_config": DataConfig(320)},
                   {"train": SplitImages(ids, paths, np.zeros((2, 1), np.float32), np.ones((2, 1), bool))}):
        other = identity_of(dataclasses.replace(cfg, **change), policy="ignore")
        assert [k for k in base if base[k] != other[k]] == list(change), change
    # Plain data: what torch.load(weights_only=True) gives back, equal to what was saved.
    assert base["betas"] == [0.9, 0.999] and base["data_config"]["input_size"] == 224


def test_settings_are_one_frozen_picklable_record_of_the_parsers_flags():
    """The flags become one typed record (finetune.settings), built without touching the parsed flags;
    it records them as runs always did: every flag but --config, sorted, betas a list."""
    import pickle

    from finetune.settings import FinetuneSettings

    parser = job.build_parser()
    args = parser.parse_args(["--metadata", "m.csv", "--images", "i", "--out", "o", "--model", "wang2017",
                              "--lse-r", "5", "--pooling", "max", "--betas", "0.8, 0.99"])
    before = dict(vars(args))
    settings = job.settings_from(args)
    assert vars(args) == before  # nothing added or parsed in place
    assert isinstance(settings, FinetuneSettings) and settings.betas == (0.8, 0.99)
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    assert [f.name for f in dataclasses.fields(FinetuneSettings)] == [*dests, "model_options"]
    assert pickle.loads(pickle.dumps(settings)) == settings  # TorchDistributor pickles what it runs
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0
    recorded = settings.to_dict()
    assert list(recorded) == sorted([*dests, "model_options"])
    assert recorded["betas"] == [0.8, 0.99] and recorded["model_options"] == {"pooling": "max", "lse_r": 5.0}
    assert list(recorded["model_options"]) == ["pooling", "lse_r"]  # finetune.choices.MODEL_FLAGS's order
    with pytest.raises(ConfigError, match=r"--betas \[0.9\]: give two values"):
        job.settings_from(parser.parse_args(["--metadata", "m.csv", "--images", "i", "--out", "o", "--betas", "0.9"]))


def test_unset_lr_epoch_choice_and_patience_follow_the_starting_weights():
    """From random weights: lr 1e-3, the epoch by val AUROC, patience 5; from pretrained ones: 1e-4, val loss, 3.
    A flag given wins; a resumed run keeps the values its checkpoint recorded (older defaults included)."""
    parser = job.build_parser()
    base = ["--metadata", "m.csv", "--images", "i", "--out", "o"]
    unset = job.settings_from(parser.parse_args(base))
    assert (unset.lr, unset.best_metric, unset.early_stop_patience) == (None, None, None)
    scratch, tuned = resolve_defaults(unset, True), resolve_defaults(unset, False)
    assert (scratch.lr, scratch.best_metric, scratch.early_stop_patience) == (1e-3, "val_auc", 5)
    assert (tuned.lr, tuned.best_metric, tuned.early_stop_patience) == (1e-4, "val_loss", 3)
    assert FROM_SCRATCH["lr"] == 10 * FINE_TUNING["lr"]
    given = job.settings_from(parser.parse_args([*base, "--lr", "3e-4", "--best-metric", "val_loss"]))
    assert (resolve_defaults(given, True).lr, resolve_defaults(given, True).best_metric) == (3e-4, "val_loss")
    old_run = {"lr": 1e-4, "best_metric": "val_loss", "early_stop_patience": 3, "epochs": 20}
    assert resolve_defaults(unset, True, old_run) == tuned
    with pytest.raises(ConfigError, match="--best-metric 'auc'"):
        job.settings_from(parser.parse_args([*base, "--best-metric", "auc"]))


def test_the_engine_imports_no_parser():
    """finetune.run takes the settings record; it never sees a parser."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "finetune" / "run.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "argparse" not in names and not any(m.startswith("jobs") for m in names)


# --- the job ------------------------------------------------------------------------------------


@needs_shared
def test_two_epochs_lower_the_training_loss(run):
    out, result = run
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert result["global_step"] == 2 * result["steps_per_epoch"] == 6
    assert result["best_epoch"] in (1, 2) and result["stopped"] == "epochs"


@needs_shared
def test_run_directory_has_the_head_runs_files_and_loadable_checkpoints(run, nih40):
    out, result = run
    for name in ("config.json", "metrics.json", "report.md", "loss.png", "roc_val.png", "roc_test.png",
                 "predictions/val.parquet", "predictions/test.parquet", BEST, LAST):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["kind"] == "finetune" and DataConfig.from_dict(config["data_config"]) == DataConfig(64)
    assert set(metrics["splits"]) == {"val", "test"} and len(metrics["label_names"]) == 14
    for split in ("val", "test"):  # AUROC intervals resample the image table's patients
        boot = metrics["splits"][split]["bootstrap"]
        assert boot["unit"] == "patient" and 0 < boot["units"] <= metrics["splits"][split]["n"]
    left_out = sum(int(n.split()[1]) for n in metrics["notes"] if "left out of the metrics" in n)
    predicted = 0
    for split in ("val", "test"):
        pred = pd.read_parquet(out / "predictions" / f"{split}.parquet")
        assert len(pred) == metrics["splits"][split]["n"] and CORRUPT not in set(pred["image_id"])
        # Who each image is, from the image table: the subgroup metrics' groups.
        assert list(pred.columns[:6]) == ["image_id", *rundir.FRONT_COLUMNS] and set(pred["source"]) == {"nih"}
        assert set(pred["sex"]) <= {"M", "F"} and set(metrics["splits"][split]["subgroups"]) >= {"sex", "age"}
        predicted += len(pred)
    assert predicted == config["images"]["val"] + config["images"]["test"] - left_out
    # The truncated file was recorded, not fatal.
    assert [os.path.basename(p) for p in metrics["unreadable"]] == [CORRUPT]
    assert any(CORRUPT in n for n in metrics["notes"])
    report = (out / "report.md").read_text()
    assert report.startswith("# Fine-tuning report: ft") and "densenet121 from random:0" in report
    assert "1 unreadable, left out" in report

    for name in (BEST, LAST):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "cxr-features/finetune" and ckpt["backbone"] == "densenet121"
        assert ckpt["label_names"] == metrics["label_names"] and ckpt["data_config"] == config["data_config"]
        assert not any(k.startswith("module.") for k in ckpt["model_state"])
    last = torch.load(out / LAST, weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(last) and last["epoch"] == 3 and last["global_step"] == 6
    assert torch.load(out / BEST, weights_only=True)["epoch"] == result["best_epoch"]

    # A finished run is kept unless asked.
    with pytest.raises(rundir.RunError, match="pass --overwrite"):
        job.main(job_args(nih40, out))


@needs_shared
def test_the_run_records_its_settings_record_in_config_json_and_the_checkpoints(run, nih40):
    out, _ = run
    flags = job_args(nih40, out, "--bbox-list", str(BBOX_CSV), "--overlays", "2", "--localize-split", "train")  # run's
    settings = resolve_defaults(job.settings_from(job.build_parser().parse_args(flags)), from_scratch=True)
    expected = json.loads(json.dumps(settings.to_dict()))  # with the weights' route's defaults resolved
    assert expected["best_metric"] == "val_auc" and expected["lr"] == 1e-3
    assert json.loads((out / "config.json").read_text())["settings"] == expected
    assert torch.load(out / BEST, map_location="cpu", weights_only=True)["config"] == expected


@needs_shared
def test_bbox_list_gives_the_accuracy_table_and_overlays(run, nih40):
    out, _ = run
    loc = json.loads((out / "metrics.json").read_text())["localization"]
    # Only the named split's boxed images are scored: here train's, the images not in val or test.
    boxed = set(read_nih_bboxes(BBOX_CSV)["image_id"]) & set(os.listdir(nih40 / "images"))
    elsewhere = {i for s in ("val", "test") for i in pd.read_parquet(out / "predictions" / f"{s}.parquet")["image_id"]}
    in_split = boxed - elsewhere
    assert loc["split"] == "train" and loc["images"] == loc["boxes"] == len(in_split) and 2 < len(in_split) < 9
    table = pd.DataFrame(loc["table"])
    overall = table[table["label"] == "all"]
    assert sorted(overall.query("measure == 'iou'")["threshold"]) == list(IOU_THRESHOLDS)
    assert sorted(overall.query("measure == 'iobb'")["threshold"]) == list(IOBB_THRESHOLDS)
    assert (overall["n"] == len(in_split)).all() and table["accuracy"].between(0, 1).all()
    assert len(loc["overlays"]) == 2 and all((out / p).is_file() for p in loc["overlays"])
    report = (out / "report.md").read_text()
    assert "## Localization (class activation maps)" in report and f"| all | {len(in_split)} |" in report
    assert f"]({loc['overlays'][0]})" in report


@pytest.mark.slow
@needs_shared
def test_interrupted_run_resumes_at_its_step_and_ends_where_an_uninterrupted_one_does(run, nih40, tmp_path):
    out = tmp_path / "ft"
    # Asked for 3 epochs, resumed with 2: --epochs is the one training setting a resume may change.
    # This part decodes every image every epoch, the resumed part and `run` read the decode cache
    # (finetune/decode_cache.py): the same inputs, so the same weights.
    first = job.main(job_args(nih40, out, "--stop-after-steps", "4", "--epochs", "3", "--no-decode-cache"))
    assert not (tmp_path / DECODE_CACHE).exists()
    assert first["stopped"] == "interrupted" and (first["epoch"], first["step"]) == (2, 1)
    assert (out / LAST).is_file() and not (out / "metrics.json").exists()

    with pytest.raises(FinetuneError, match=r"other training settings \(batch_size: checkpoint=8, now=4\)"):
        job.main(job_args(nih40, out, "--batch-size", "4"))
    # Optimizer and schedule settings too: a resume would keep the checkpoint's while config.json showed these.
    with pytest.raises(FinetuneError, match=r"\(lr: checkpoint=0\.001, now=0\.01; schedule: checkpoint='plateau', "
                                            r"now='step'\)"):
        job.main(job_args(nih40, out, "--lr", "1e-2", "--schedule", "step"))
    for flag, value in (("--step-epochs", "5"), ("--betas", "0.8,0.99"), ("--focal-gamma", "1"),
                        ("--weight-decay", "1e-4"), ("--train-seed", "1")):
        with pytest.raises(FinetuneError, match="other training settings"):
            job.main(job_args(nih40, out, flag, value))

    second = job.main(job_args(nih40, out))
    assert len([c for c in (tmp_path / DECODE_CACHE).iterdir() if c.is_dir()]) == 2  # train, val
    assert second["resumed_from"] == {"epoch": 2, "step": 1, "global_step": 4}
    assert second["steps_this_run"] == 2 and second["global_step"] == 6
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    # Same data order, crops, optimizer and RNG state: the same weights as the run never stopped.
    want = torch.load(run[0] / LAST, weights_only=True)["model_state"]
    got = torch.load(out / LAST, weights_only=True)["model_state"]
    assert all(torch.equal(want[k], got[k]) for k in want)
    for a, b in zip(second["history"], run[1]["history"]):
        assert (a["train_loss"], a["val_loss"], a["val_auc"]) == (b["train_loss"], b["val_loss"], b["val_auc"])


@pytest.mark.ddp
@needs_shared
def test_two_torch_distributor_processes_end_with_the_same_weights(nih40, tmp_path, spark):
    out = tmp_path / "ddp"
    result = job.main(job_args(nih40, out, "--num-processes", "2", "--num-workers", "1", "--batch-size", "4"),
                      spark=spark)
    assert result["world_size"] == 2 and result["stopped"] == "epochs"
    digests = result["rank_state_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # ...and they are the weights saved in last.pt.
    assert digests[0] == state_sha256(torch.load(out / LAST, weights_only=True)["model_state"])
    # 24 images over 2 ranks in batches of 4: 3 steps an epoch, as one process with batch 8.
    assert result["steps_per_epoch"] == 3 and result["global_step"] == 6
    assert json.loads((out / "metrics.json").read_text())["training"]["world_size"] == 2


@needs_shared
def test_extraction_job_takes_a_finetune_checkpoint_as_backbone(run, nih40, tmp_path, spark):
    out, _ = run
    best = out / BEST
    source = resolve_weights("densenet121", str(best))
    assert source.kind == "checkpoint" and source.path == str(best)

    # The extractor built from best.pt gives the fine-tuned model's pooled features, exactly.
    model, _ = load_classifier(best)
    model.classifier = nn.Identity()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(build_extractor("densenet121", str(best))(x), model(x))

    store = tmp_path / "store"
    extract.main(["--dataset", "nih", "--metadata", str(nih40 / "meta.csv"), "--images", str(nih40 / "images"),
                  "--out", str(store), "--backbone", "densenet121", "--weights", str(best), "--limit", "16",
                  "--split", "ratios", "--chunk-size", "8", "--images-per-task", "3", "--progress-interval", "1",
                  "--precision", "fp32"],
                 spark=spark)
    manifest = read_manifest(store)
    assert manifest["weights"] == f"checkpoint:{best}" and manifest["weights_sha256"] == source.sha256
    rows = {s: read_split(store, s) for s in ("train", "val", "test") if (store / f"split={s}").is_dir()}
    ids = np.concatenate([r.image_id for r in rows.values()])
    features = np.concatenate([r.features for r in rows.values()])
    # Extraction takes the checkpoint's own input (64 px, its geometry), not the registry's 224.
    ckpt_config = torch.load(best, weights_only=True)["data_config"]
    assert manifest["data_config"] == ckpt_config and manifest["precision"] == "fp32"
    # ...so its features are the fine-tuned model's own pooled features on its evaluation input.
    eval_ds = ImageDataset([str(nih40 / "images" / i) for i in ids], np.zeros((len(ids), 1)), np.ones((len(ids), 1)),
                           DataConfig.from_dict(ckpt_config), train=False)
    with torch.inference_mode():
        want = model(torch.stack([eval_ds[k][0] for k in range(len(ids))])).numpy()
    np.testing.assert_allclose(features, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    # ...and the chain goes on: a head on that store predicts from image files at the checkpoint's 64 px.
    head_run = tmp_path / "head"
    heads_train.main(["--store", str(store), "--out", str(head_run), "--epochs", "1", "--threads", "1", "--quiet",
                      "--labels", "Effusion,Infiltration", "--bootstrap-draws", "0"])
    preds = pd.read_parquet(heads_predict.main(["--run", str(head_run), "--images", str(nih40 / "images" / ids[0]),
                                                "--precision", "fp32", "--out", str(tmp_path / "p.parquet")]))
    assert preds["error"].isna().all() and len(preds) == 1
    assert preds[["Effusion", "Infiltration"]].notna().all(axis=None)


def test_refusals_before_any_training(tmp_path, nih40):
    with pytest.raises(ConfigError, match="--bbox-list: CAM is defined for .*not vgg19"):
        job.main(job_args(nih40, tmp_path / "x", "--backbone", "vgg19", "--bbox-list", str(BBOX_CSV)))
    with pytest.raises(ConfigError, match="--schedule 'cosine'"):
        job.main(job_args(nih40, tmp_path / "x", "--schedule", "cosine"))
    with pytest.raises(ValueError, match="--loss 'hinge'"):
        job.main(job_args(nih40, tmp_path / "x", "--loss", "hinge"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@needs_shared
def test_a_finished_run_continues_for_more_epochs_without_overwrite(run, nih40, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(run[0], out)
    with pytest.raises(rundir.RunError, match="it ran 2 epochs; ask for more with --epochs"):
        job.main(job_args(nih40, out, "--bbox-list", str(BBOX_CSV), "--overlays", "2", "--localize-split", "train"))
    more = job.main(job_args(nih40, out, "--bbox-list", str(BBOX_CSV), "--overlays", "2", "--localize-split", "train",
                             "--epochs", "3"))
    assert more["resumed_from"] == {"epoch": 3, "step": 0, "global_step": 6}
    assert [h["epoch"] for h in more["history"]] == [1, 2, 3] and more["global_step"] == 9
    assert more["history"][:2] == run[1]["history"]  # the first two epochs are the finished run's own
    assert json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"] == 3


# --- the run directory is safe output (common/runs/rundir.py, common/runs/safe_output.py) --------------------


def finetune_cli(capsys, *argv) -> tuple[int, str]:
    """jobs/fine_tune.py's exit status and its last stderr line, for a run expected to fail."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        job.cli(list(argv))
    return info.value.code, capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_only_looks_like_a_run_is_refused_and_kept(nih40, tmp_path, capsys, overwrite):
    # A config.json without metrics.json once read as "started, not checkpointed" and was wiped.
    out = tmp_path / "results"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("mine")
    code, line = finetune_cli(capsys, *job_args(nih40, out, *overwrite))
    assert code == 2 and line == (f"jobs/fine_tune.py: error: --out {out}: exists and is not a run directory of this "
                                  "project (no .cxr-run.json); refusing to write into it")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == '{"mine": true}'


def test_a_run_stopped_before_its_first_checkpoint_starts_over_keeping_other_files(tmp_path):
    from finetune.run import prepare_out

    out = rundir.prepare(tmp_path / "ft", overwrite=False, kind="finetune")
    rundir.write_json(out / rundir.CONFIG, {"kind": "finetune"})
    (out / "notes.txt").write_text("mine")
    assert prepare_out(str(out), False, {}, 2) == (out, None)
    assert sorted(p.name for p in out.iterdir()) == [rundir.MARKER, "notes.txt"]
    # A head run there is another matter: never replaced by a fine-tune, --overwrite or not.
    head = rundir.prepare(tmp_path / "head", overwrite=False, kind="head")
    rundir.write_json(head / rundir.CONFIG, {})
    for overwrite in (False, True):
        with pytest.raises(rundir.RunError, match="holds a head run, and this command writes a finetune run"):
            prepare_out(str(head), overwrite, {}, 2)


@needs_shared
def test_overwrite_of_a_finetune_run_deletes_every_file_it_wrote_and_nothing_else(run, tmp_path):
    out = tmp_path / "ft"
    shutil.copytree(run[0], out)  # with --bbox-list: localization/ overlays too
    (out / "notes.txt").write_text("mine")
    (out / "localization" / "my-box.txt").write_text("mine")
    logged = []
    rundir.prepare(out, overwrite=True, kind="finetune", log=logged.append)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        rundir.MARKER, "localization", "localization/my-box.txt", "notes.txt"]
    assert logged[-1].endswith("that this project did not write: localization/my-box.txt, notes.txt")


def test_a_finetune_run_directory_another_job_writes_is_refused(nih40, tmp_path, capsys):
    import socket

    from common.runs.safe_output import OutputLock

    with OutputLock(tmp_path / "ft"):
        code, line = finetune_cli(capsys, *job_args(nih40, tmp_path / "ft"))
    assert code == 2 and line.startswith(f"jobs/fine_tune.py: error: {tmp_path / 'ft'}: another job is writing here "
                                         f"(host {socket.gethostname()}, pid {os.getpid()}")
    assert list((tmp_path / "ft").iterdir()) == []  # no marker, no config: it stopped before writing


def test_finetune_out_under_a_file_or_on_a_full_disk_is_one_line(nih40, tmp_path, capsys, monkeypatch):
    import errno

    (tmp_path / "f").write_text("x")
    code, line = finetune_cli(capsys, *job_args(nih40, tmp_path / "f" / "ft"))
    assert code == 2 and line == (f"jobs/fine_tune.py: error: --out {tmp_path / 'f' / 'ft'}: is under {tmp_path / 'f'}, "
                                  "which is a file, not a folder")

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "write_json", full)
    code, line = finetune_cli(capsys, *job_args(nih40, tmp_path / "ft"))
    assert code == 2 and line == f"jobs/fine_tune.py: error: {tmp_path / 'ft' / rundir.MARKER}: no space left on device"
    assert not (tmp_path / "ft" / ".cxr.lock").exists()
