"""End to end: train on small synthetic stores, then predict and re-render the report.

The planted-signal store (feature c shifted when label c is positive) must be learnt to val
AUROC > 0.9; the pure-noise store must stay near 0.5 (a leak of labels or val statistics into
the inputs would push it up).
"""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from common.data.labels import CHEXPERT_COMPETITION, CHEXPERT_LABELS
from common.evaluation import report
from heads import predict, train
from heads.checkpoint import load_head
from tests.heads_fixtures import synthetic_rows, synthetic_store, write_store

# One thread: tiny matmuls on two threads slow to a crawl when other processes hold the cores.
FAST = ["--epochs", "30", "--batch-size", "64", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {
        "signal": synthetic_store(root / "signal", signal=2.5, seed=1),
        "noise": synthetic_store(root / "noise", signal=0.0, seed=2),
    }


@pytest.fixture(scope="module")
def signal_run(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "signal"
    summary = train.main(["--store", str(stores["signal"]), "--out", str(out), "--age-sex", *FAST])
    return out, summary


def test_planted_signal_is_learnt(signal_run):
    out, summary = signal_run
    assert summary["val_mean_auc"] > 0.9
    assert summary["test_mean_auc"] > 0.9


def test_pure_noise_stays_near_chance(stores, tmp_path):
    summary = train.main(["--store", str(stores["noise"]), "--out", str(tmp_path / "run"), *FAST])
    assert abs(summary["val_mean_auc"] - 0.5) < 0.06
    assert abs(summary["test_mean_auc"] - 0.5) < 0.06


def test_run_directory_describes_itself(signal_run, stores):
    out, _ = signal_run
    for name in ("head.pt", "config.json", "metrics.json", "report.md", "loss.png", "roc_val.png", "roc_test.png",
                 "predictions/val.parquet", "predictions/test.parquet"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    manifest_hash = config["stores"][0]["manifest_sha256"]
    assert config["settings"]["age_sex"] is True and config["input_width"] == 34 and len(manifest_hash) == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}
    assert {"mean_auc", "w_auc", "mean_d_auc", "mean_n_auc"} <= set(metrics["splits"]["test"]["summary"])
    assert metrics["history"][metrics["best_epoch"] - 1]["val_loss"] == min(h["val_loss"] for h in metrics["history"])
    # AUROC intervals by patient (the fixture's patients have two images each), for both scored splits.
    for split in ("val", "test"):
        m = metrics["splits"][split]
        assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["units"] == 150
        assert m["bootstrap"]["draws"] == 1000 and m["bootstrap"]["seed"] == 0
        assert m["bootstrap"]["valid_draws"]["mean"] == 1000
        s = m["summary"]
        assert s["mean_auc_ci_low"] < s["mean_auc"] < s["mean_auc_ci_high"]
        for c in m["per_class"].values():
            assert c["auroc_ci_low"] <= c["auroc"] <= c["auroc_ci_high"]
    text = (out / "report.md").read_text()
    assert "| Atelectasis |" in text and "Wang 2017" in text and "CheXNet" in text and "CheXpert paper" not in text
    atelectasis = metrics["splits"]["test"]["per_class"]["Atelectasis"]
    assert (f"{atelectasis['auroc']:.3f} ({atelectasis['auroc_ci_low']:.2f}-{atelectasis['auroc_ci_high']:.2f})"
            in text.split("| Atelectasis |")[1].splitlines()[0])
    assert "of a patient-level bootstrap: 1000 draws" in text and "seed 0" in text and "(val 150 patients, test 150 patients)" in text
    head = load_head(out)
    assert head.inputs.width == 34 and head.label_names == metrics["label_names"] and head.stores[0]["path"] == str(stores["signal"])


def test_same_seed_gives_identical_heads(stores, tmp_path):
    args = ["--store", str(stores["signal"]), "--epochs", "3", "--batch-size", "64", "--threads", "1", "--quiet",
            "--head", "mlp3-dropout", "--init-seed", "7"]
    train.main([*args, "--out", str(tmp_path / "a")])
    train.main([*args, "--out", str(tmp_path / "b")])
    a, b = load_head(tmp_path / "a"), load_head(tmp_path / "b")
    assert a.spec.dropout == 0.5
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert json.loads((tmp_path / "a" / "config.json").read_text())["settings"]["init_seed"] == 7


def test_the_init_seed_flag_is_not_called_seed_which_is_the_jobs_split_seed():
    assert train.build_parser().parse_args(["--init-seed", "3"]).init_seed == 3
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--seed", "3"])


def test_grid_search_records_every_cell_and_picks_the_best(stores, tmp_path):
    out = tmp_path / "grid"
    train.main(["--store", str(stores["signal"]), "--out", str(out), "--grid-lr", "1e-3,3e-3",
                "--grid-weight-decay", "0,1e-4", "--head", "linear", "--loss", "focal", "--precision", "fp32",
                "--epochs", "5", "--batch-size", "64", "--threads", "1", "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    cells = metrics["grid"]
    assert [(c["lr"], c["weight_decay"]) for c in cells] == [(1e-3, 0), (1e-3, 1e-4), (3e-3, 0), (3e-3, 1e-4)]
    best = max(cells, key=lambda c: c["val_auc"])
    assert (metrics["selected"]["lr"], metrics["selected"]["weight_decay"]) == (best["lr"], best["weight_decay"])
    assert "## Grid search" in (out / "report.md").read_text()


def test_config_file_sets_defaults_and_flags_override(stores, tmp_path):
    conf = tmp_path / "heads.toml"
    conf.write_text(f'[train]\nstore = ["{stores["noise"]}"]\nepochs = 1\nlr = 0.01\nhidden = [16, 8]\n'
                    'threads = 1\nquiet = true\nbootstrap-draws = 0\n')
    train.main(["--config", str(conf), "--out", str(tmp_path / "run"), "--epochs", "2"])
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert (settings["epochs"], settings["lr"], settings["hidden"]) == (2, 0.01, [16, 8])
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["splits"]["test"]  # no intervals asked
    assert "bootstrap" not in test and "mean_auc_ci_low" not in test["summary"]
    assert "AUROC intervals" not in (tmp_path / "run" / "report.md").read_text()
    conf.write_text("[train]\nepoch = 3\n")
    with pytest.raises(SystemExit):
        train.cli(["--config", str(conf), "--out", str(tmp_path / "other")])


def test_refusals_exit_with_one_line(stores, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.cli(["--store", str(stores["signal"]), "--out", str(tmp_path / "x"), "--labels", "competition"])
    assert capsys.readouterr().err.strip().endswith("is not a label of this store (" + ", ".join(
        json.loads((stores["signal"] / "manifest.json").read_text())["label_names"]) + ")")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        train.cli(["--store", str(stores["signal"]), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and "\n" not in err
    with pytest.raises(SystemExit):
        train.cli(["--store", str(stores["signal"]), "--out", str(tmp_path / "z"), "--bootstrap-draws", "50"])
    err = capsys.readouterr().err.strip()
    assert "--bootstrap-draws 50: 0 (no intervals) or at least 100" in err and "\n" not in err


def test_chexpert_policies_subset_and_nan_class(tmp_path):
    rng = np.random.default_rng(3)
    names = CHEXPERT_LABELS
    splits = {s: synthetic_rows(n, 16, len(names), rng, signal=2.5, uncertain=0.1, prefix=s)
              for s, n in {"train": 400, "val": 200}.items()}
    splits["val"]["labels"][:, names.index("Edema")] = 0  # no Edema positives in val
    store = write_store(tmp_path / "chexpert", splits, names, dataset="chexpert", backbone="densenet121")
    out = tmp_path / "run"
    train.main(["--store", str(store), "--out", str(out), "--labels", "competition", "--policy", "ones",
                "--loss", "bce+msml", "--age-sex", "--sex-encoding", "onehot", *FAST])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_names"] == list(CHEXPERT_COMPETITION)
    assert metrics["splits"]["val"]["per_class"]["Edema"]["auroc"] is None
    assert any("Edema: no positives" in n for n in metrics["notes"])
    text = (out / "report.md").read_text()
    assert "CheXpert paper U-Ones" in text and "| 0.941 |" in text and "Wang 2017" not in text
    assert "U-MultiClass" not in text  # the row of the run's own policy only


def test_predict_from_store_matches_the_run(signal_run, stores, tmp_path):
    out, _ = signal_run
    path = predict.main(["--run", str(out), "--split", "val", "test", "--out", str(tmp_path / "p.parquet")])
    got = pd.read_parquet(path)
    saved = pd.read_parquet(out / "predictions" / "test.parquet")
    test = got[got["split"] == "test"].reset_index(drop=True)
    assert len(got) == 600 and list(test["image_id"]) == list(saved["image_id"])
    names = json.loads((out / "metrics.json").read_text())["label_names"]
    np.testing.assert_allclose(test[names].to_numpy(), saved[names].to_numpy(), rtol=1e-6)
    csv = predict.main(["--run", str(out), "--store", str(stores["signal"]), "--split", "val", "--out",
                        str(tmp_path / "p.csv")])
    assert list(pd.read_csv(csv).columns) == ["image_id", "split", *names]


def test_predict_refuses_features_from_another_backbone(signal_run, tmp_path, capsys):
    out, _ = signal_run
    other = synthetic_store(tmp_path / "other", sizes={"val": 20}, backbone="densenet121")
    with pytest.raises(SystemExit):
        predict.cli(["--run", str(out), "--store", str(other), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert "backbone 'densenet121' differs" in err and err.count("\n") == 1


@pytest.mark.slow
def test_report_rerenders_from_the_run_directory(signal_run):
    out, _ = signal_run
    before = (out / "report.md").read_text()
    for name in ("report.md", "loss.png", "roc_test.png"):
        (out / name).unlink()
    result = subprocess.run([sys.executable, "-m", "heads.report", "--run", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    assert (out / "report.md").read_text() == before
    assert (out / "loss.png").is_file() and (out / "roc_test.png").is_file()
    report.render(out)  # and in-process


def test_ground_truth_is_the_same_under_every_policy(tmp_path):
    """The policy shapes the loss only: n_pos/n_neg and saved targets are the raw certain labels."""
    rng = np.random.default_rng(5)
    names = CHEXPERT_LABELS
    splits = {s: synthetic_rows(n, 16, len(names), rng, signal=2.5, uncertain=0.2, prefix=s)
              for s, n in {"train": 300, "val": 150, "test": 150}.items()}
    store = write_store(tmp_path / "chexpert", splits, names, dataset="chexpert", backbone="densenet121")
    raw = np.asarray(splits["test"]["labels"])
    seen = {}
    for policy in ("ignore", "zeros", "ones"):
        out = tmp_path / policy
        train.main(["--store", str(store), "--out", str(out), "--labels", "competition", "--policy", policy, *FAST])
        metrics = json.loads((out / "metrics.json").read_text())
        per_class = metrics["splits"]["test"]["per_class"]
        # The per-epoch val AUROC (grid choice, progress line) is the raw-label one the metrics report.
        best = metrics["history"][metrics["best_epoch"] - 1]["val_auc"]
        assert best == pytest.approx(metrics["splits"]["val"]["summary"]["mean_auc"], abs=1e-6)
        seen[policy] = {n: (c["n_pos"], c["n_neg"]) for n, c in per_class.items()}
        saved = pd.read_parquet(out / "predictions" / "test.parquet").set_index("image_id")
        for name in CHEXPERT_COMPETITION:
            col = raw[:, names.index(name)]
            assert seen[policy][name] == (int((col == 1).sum()), int((col == 0).sum()))
            by_id = dict(zip(splits["test"]["image_id"], col))
            assert (saved[f"label:{name}"].to_numpy() == np.array([by_id[i] for i in saved.index])).all()
            assert (saved[f"label:{name}"] == -1).any()  # the uncertain entries are kept as -1
    assert seen["ignore"] == seen["zeros"] == seen["ones"]


def test_a_first_epoch_that_diverges_is_refused(stores, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.cli(["--store", str(stores["signal"]), "--out", str(tmp_path / "run"), "--lr", "1e30", *FAST])
    err = capsys.readouterr().err
    assert "diverged in its first epoch" in err
    assert not (tmp_path / "run" / "head.pt").exists()


def test_chexpert_runs_are_also_scored_per_study(tmp_path):
    """CheXpert's study-level evaluation: a study scores its images' highest probability."""
    rng = np.random.default_rng(7)
    names = CHEXPERT_LABELS
    splits = {}
    for s, n in {"train": 300, "val": 120, "test": 120}.items():
        rows = synthetic_rows(n, 16, len(names), rng, signal=2.5, prefix=s)
        # Two views per study, sharing the study's labels as CheXpert's report-derived labels do.
        rows["labels"][1::2] = rows["labels"][0::2]
        rows["image_id"] = [f"CheXpert-v1.0-small/{s}/patient{i // 4:05d}/study{(i // 2) % 2 + 1}/view{i % 2 + 1}_frontal.jpg"
                            for i in range(n)]
        rows["patient_id"] = [f"patient{i // 4:05d}" for i in range(n)]
        splits[s] = rows
    store = write_store(tmp_path / "chexpert", splits, names, dataset="chexpert", backbone="densenet121")
    out = tmp_path / "run"
    train.main(["--store", str(store), "--out", str(out), "--labels", "competition", *FAST])
    test = json.loads((out / "metrics.json").read_text())["splits"]["test"]
    study = test["study_level"]
    assert study["studies"] == 60 and study["label_disagreements"] == 0
    pred = pd.read_parquet(out / "predictions" / "test.parquet")
    pred["study"] = pred["image_id"].str.extract(r"(patient\d+/study\d+)", expand=False)
    by_study = pred.groupby("study").agg({"Edema": "max", "label:Edema": "first"})
    known = by_study["label:Edema"] >= 0
    want = roc_auc_score(by_study.loc[known, "label:Edema"], by_study.loc[known, "Edema"])
    assert study["per_class"]["Edema"]["auroc"] == pytest.approx(want)
    assert study["per_class"]["Edema"]["n_pos"] + study["per_class"]["Edema"]["n_neg"] == int(known.sum())
    text = (out / "report.md").read_text()
    assert "test study AUROC" in text and "60 studies" in text


def test_constant_features_are_refused(tmp_path, capsys):
    # A randomly initialised MobileNet's features: ~1e-10 everywhere; a head would score exactly 0.5.
    rng = np.random.default_rng(0)
    splits = {s: synthetic_rows(n, 16, 14, rng, prefix=s) for s, n in {"train": 40, "val": 20}.items()}
    for rows in splits.values():
        rows["features"] = (1e-10 * (1 + 1e-3 * rng.random(rows["features"].shape))).astype(np.float32)
    store = write_store(tmp_path / "flat", splits)
    with pytest.raises(SystemExit):
        train.cli(["--store", str(store), "--out", str(tmp_path / "run"), *FAST])
    err = capsys.readouterr().err
    assert "train: features are constant" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "head.pt").exists()


def test_settings_are_one_frozen_picklable_record_that_config_json_keeps(signal_run, stores):
    """The flags become one typed record (heads.settings); config.json's "settings" is that record."""
    import dataclasses
    import pickle

    from heads.settings import HeadSettings

    out, _ = signal_run
    args = train.build_parser().parse_args(["--store", "a", "b", "--out", "o", "--hidden", "16,8", "--betas", "0.8,0.9"])
    settings = train.settings_from(args)
    assert isinstance(settings, HeadSettings)
    assert (settings.store, settings.hidden, settings.betas, settings.grid_lr) == (("a", "b"), (16, 8), (0.8, 0.9), ())
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0
    assert list(settings.to_dict()) == [k for k in vars(args) if k != "config"]  # config.json's keys, in order
    recorded = json.loads((out / "config.json").read_text())["settings"]
    flags = ["--store", str(stores["signal"]), "--out", str(out), "--age-sex", *FAST]  # signal_run's
    assert recorded == json.loads(json.dumps(train.settings_from(train.build_parser().parse_args(flags)).to_dict()))


def test_the_engine_raises_and_the_command_turns_it_into_one_line(stores, tmp_path, capsys):
    """heads.run never sees a parser: it raises, and heads.train exits with the one line."""
    import ast
    from dataclasses import replace
    from pathlib import Path

    from common.runs.rundir import RunError
    from heads.run import run

    settings = train.settings_from(train.build_parser().parse_args(
        ["--store", str(stores["signal"]), "--out", str(tmp_path / "run"), "--lr", "1e30", *FAST]))
    (tmp_path / "run").mkdir()
    with pytest.raises(RunError, match="diverged in its first epoch"):
        run(settings, tmp_path / "run", "cmd")
    with pytest.raises(ValueError, match="--head 'mlp9'"):
        run(replace(settings, head="mlp9"), tmp_path / "run", "cmd")
    assert not (tmp_path / "run" / "head.pt").exists()
    for module in ("run", "grid", "selftrain"):  # nor could it: the engine imports no parser
        tree = ast.parse((Path(__file__).parents[1] / "heads" / f"{module}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not {m for m in names if m == "argparse" or m.endswith(".fail")}, module
