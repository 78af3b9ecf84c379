"""The rest of CheXpert's uncertainty approaches on heads: U-MultiClass and U-SelfTrained."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.training.losses import multiclass_ce
from common.data.targets import apply_policy, eval_targets
from heads import train
from heads.models import HeadSpec, build_head
from tests.heads_fixtures import synthetic_rows, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--threads", "1", "--quiet", "--bootstrap-draws", "0", "--batch-size", "128", "--precision", "fp32"]


def test_multiclass_targets_loss_and_renormalization_by_hand():
    labels = np.array([[1, 0, -1]], dtype=np.int8)
    classes, mask = apply_policy(labels, "multiclass")
    assert classes.tolist() == [[2, 0, 1]] and mask.all()

    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])  # (1, 3 labels, 3 classes)
    def nll(z, c):
        return -np.log(np.exp(z[c]) / np.exp(z).sum())
    by_hand = np.mean([nll(np.array([0.0, 1.0, 2.0]), 2), nll(np.array([3.0, 0.0, -1.0]), 0), nll(np.array([0.5] * 3), 1)])
    assert multiclass_ce(logits, torch.from_numpy(classes), torch.from_numpy(mask.astype(np.float32))).item() == \
        pytest.approx(by_hand, rel=1e-6)

    head = build_head(HeadSpec.make("linear", 4, 3, outputs_per_label=3))
    x = torch.randn(5, 4)
    with torch.no_grad():
        p = torch.softmax(head.three_way(x), dim=2)
        renormalized = p[..., 2] / (p[..., 0] + p[..., 2])
        torch.testing.assert_close(torch.sigmoid(head(x)), renormalized)  # what every consumer reads


def _chexpert_like(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    splits = {s: synthetic_rows(n, 16, 5, rng, signal=2.0, uncertain=0.15, prefix=s)
              for s, n in {"train": 600, "val": 300, "test": 300}.items()}
    names = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    return write_store(tmp_path / "store", splits, label_names=names, dataset="chexpert"), splits


def test_multiclass_runs_scores_the_raw_labels_and_reloads(tmp_path, capsys):
    from heads.checkpoint import load_head
    from heads.predictions import probabilities

    store, splits = _chexpert_like(tmp_path)
    runs = {}
    for policy in ("ignore", "multiclass"):
        runs[policy] = tmp_path / policy
        train.main(["--store", str(store), "--out", str(runs[policy]), "--policy", policy, "--epochs", "15", *FAST])
    metrics = {p: json.loads((r / "metrics.json").read_text()) for p, r in runs.items()}
    for name in metrics["ignore"]["label_names"]:  # the ground truth does not move with the policy
        a, b = (metrics[p]["splits"]["test"]["per_class"][name] for p in runs)
        assert (a["n_pos"], a["n_neg"]) == (b["n_pos"], b["n_neg"])
    assert metrics["multiclass"]["splits"]["test"]["summary"]["mean_auc"] > 0.8  # it learned the signal
    assert any("U-MultiClass" in n for n in metrics["multiclass"]["notes"])
    head = load_head(runs["multiclass"])
    test = splits["test"]
    nan = np.full(len(test["image_id"]), np.nan, dtype=np.float32)
    probs = probabilities(head, test["features"], nan, nan, "fp32")
    import pandas as pd

    saved = pd.read_parquet(runs["multiclass"] / "predictions" / "test.parquet")
    np.testing.assert_allclose(saved[head.label_names].to_numpy(), probs, rtol=1e-4, atol=1e-5)
    assert "CheXpert paper U-MultiClass" in (runs["multiclass"] / "report.md").read_text()
    # The loss it trained with is named, in the log and the report, not the --loss it did not use.
    assert "loss multiclass_ce (U-MultiClass" in capsys.readouterr().err
    assert "- loss multiclass_ce (U-MultiClass" in (runs["multiclass"] / "report.md").read_text()


def _self_training_store(tmp_path):
    """Two findings whose uncertain labels are in truth positive (A) and negative (B): uncertain A entries
    carry A's signal, uncertain B entries none. U-Ignore trains on few A positives; self-training can use
    the uncertain ones it recognizes."""
    rng = np.random.default_rng(3)
    splits = {}
    for split, n in {"train": 800, "val": 600, "test": 200}.items():
        truth = (rng.random((n, 2)) < np.array([0.3, 0.3])).astype(np.int8)
        features = rng.standard_normal((n, 64)).astype(np.float32)
        features[:, :16] += 0.6 * truth[:, :1]  # A's signal spread over 16 features: more examples help
        features[:, 16:32] += 0.45 * truth[:, 1:]
        labels = truth.copy()
        if split == "train":
            labels[(truth[:, 0] == 1) & (rng.random(n) < 0.95), 0] = -1  # nearly all A positives are uncertain
            labels[(truth[:, 1] == 0) & (rng.random(n) < 0.3), 1] = -1  # some B negatives are uncertain
        splits[split] = {"image_id": [f"{split}_{i:05d}.png" for i in range(n)],
                         "patient_id": [f"{split}{i}" for i in range(n)], "age": np.full(n, 50, np.float32),
                         "sex": np.zeros(n), "labels": labels, "features": features}
    return write_store(tmp_path / "store", splits, label_names=("A", "B"), dataset="table"), splits


def test_self_training_moves_uncertain_labels_the_right_way_and_beats_u_ignore(tmp_path):
    store, _ = _self_training_store(tmp_path)
    common = ["--store", str(store), "--head", "linear", "--loss", "bce", "--epochs", "60", "--lr", "1e-2", *FAST]
    train.main([*common, "--out", str(tmp_path / "ignore"), "--policy", "ignore"])
    train.main([*common, "--out", str(tmp_path / "self"), "--policy", "selftrained", "--self-train-rounds", "4"])
    ignore = json.loads((tmp_path / "ignore" / "metrics.json").read_text())
    self_ = json.loads((tmp_path / "self" / "metrics.json").read_text())
    rounds = self_["self_training"]
    assert 1 <= len(rounds) <= 4 and rounds[-1]["stopped"] in ("converged", "max rounds")
    first = rounds[0]["per_class_mean"]
    assert first["A"] > 0.5 > first["B"]  # uncertain A relabelled toward positive, uncertain B toward negative
    auc = {name: m["splits"]["val"]["summary"]["mean_auc"] for name, m in (("ignore", ignore), ("self", self_))}
    assert auc["self"] > auc["ignore"], auc
    # The ground truth is the raw labels in both runs.
    for name in ("A", "B"):
        a, b = ignore["splits"]["val"]["per_class"][name], self_["splits"]["val"]["per_class"][name]
        assert (a["n_pos"], a["n_neg"]) == (b["n_pos"], b["n_neg"])


def test_policy_flags_are_checked():
    with pytest.raises(SystemExit):
        train.cli(["--store", "s", "--out", "o", "--policy", "twice"])
    with pytest.raises(SystemExit):
        train.cli(["--store", "s", "--out", "o", "--policy", "selftrained", "--self-train-rounds", "0"])
    assert eval_targets(np.array([[-1, 1]]))[1].tolist() == [[False, True]]


def test_compare_says_which_policy_wins_per_class_beside_the_papers_table(tmp_path):
    from heads import compare

    store, _ = _chexpert_like(tmp_path)
    runs = []
    for policy in ("ignore", "ones", "multiclass"):
        runs.append(tmp_path / policy)
        train.main(["--store", str(store), "--out", str(runs[-1]), "--policy", policy, "--epochs", "5", *FAST])
    compare.main([*map(str, runs), "--out", str(tmp_path / "cmp")])
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Which uncertainty policy wins, per class (test)" in md
    # The paper's table: U-Ones best for Atelectasis and Edema, U-MultiClass for Cardiomegaly.
    assert "| Atelectasis |" in md and "ones (0.858)" in md and "multiclass (0.854)" in md


def test_fine_tuning_refuses_the_head_only_policies(tmp_path, capsys):
    from jobs import fine_tune

    with pytest.raises(SystemExit) as exit_:
        fine_tune.cli(["--dataset", "nih", "--metadata", "m.csv", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--policy", "selftrained"])
    assert exit_.value.code == 2 and "--policy 'selftrained': choose from ignore, zeros, ones, multiclass" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_u_multiclass_fine_tunes_on_images(tmp_path):
    """A 3-way softmax per observation on images: training and validation on the 3-way loss, evaluation,
    CAM, extraction and the service on z+ - z-, the positive logit renormalized over {negative, positive}."""
    import pandas as pd

    from common.models.architectures import ThreeWay
    from common.images.data_config import DataConfig
    from common.models.inference import FeatureExtractor
    from finetune.checkpoint import load_classifier
    from common.models.cam import heatmap_fn
    from common.models.model_registry import get_spec
    from jobs import fine_tune
    from tests.data_paths import SAMPLE

    out = tmp_path / "ft"
    result = fine_tune.main(["--dataset", "nih", "--metadata",
                            str(SAMPLE / "Data_Entry_2017_v2020.csv"), "--images", str(SAMPLE / "images"),
                            "--out", str(out), "--backbone", "resnet50", "--weights", "random:0", "--input-size", "64",
                            "--batch-size", "8", "--epochs", "3", "--lr", "1e-3", "--threads", "1", "--num-workers",
                            "0", "--split", "ratios", "--early-stop-patience", "0", "--policy", "multiclass",
                            "--precision", "fp32"])
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] and all(np.isfinite(h["val_auc"]) for h in result["history"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("U-MultiClass" in n for n in metrics["notes"])
    model, obj = load_classifier(out / "best.pt")
    assert isinstance(model, ThreeWay) and obj["outputs_per_label"] == 3
    config = DataConfig.from_dict(obj["data_config"])
    image = sorted((SAMPLE / "images").glob("*.png"))[0]
    x = config.to_tensor(config.load(str(image))[None])
    with torch.no_grad():
        z = model.three_way(x)
        p = torch.softmax(z, dim=2)
        renormalized = (p[..., 2] / (p[..., 0] + p[..., 2]))[0].numpy()
        maps, logits = heatmap_fn(model, get_spec("resnet50"))(x)
    saved = pd.read_parquet(out / "predictions" / "test.parquet").set_index("image_id")
    if image.name in saved.index:
        np.testing.assert_allclose(saved.loc[image.name, metrics["label_names"]].to_numpy(float), renormalized,
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(torch.sigmoid(logits)[0].numpy(), renormalized, rtol=1e-4, atol=1e-5)
    assert maps.shape[:2] == (1, len(metrics["label_names"]))
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + (model.inner.fc.bias.view(-1, 3)[:, 2]
                                                        - model.inner.fc.bias.view(-1, 3)[:, 0]), logits,
                               rtol=1e-4, atol=1e-4)  # CAM of z+ - z- averages to it
    extractor = FeatureExtractor("resnet50", str(out / "best.pt"), 0, precision="fp32", threads=1, data_config=config)
    assert extractor(config.load(str(image))[None]).shape == (1, 2048)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_fine_tune_runs_checkpoint_ensemble(tmp_path):
    """The CheXpert paper's ensemble of one run's checkpoints: epochs kept, the best three averaged and scored."""
    import pandas as pd

    from jobs import fine_tune
    from tests.data_paths import SAMPLE

    out = tmp_path / "ft"
    fine_tune.main(["--dataset", "nih", "--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"),
                   "--images", str(SAMPLE / "images"), "--out", str(out), "--backbone", "densenet121",
                   "--weights", "random:0", "--input-size", "64", "--batch-size", "8", "--epochs", "4", "--lr", "1e-3",
                   "--threads", "1", "--num-workers", "0", "--split", "ratios", "--early-stop-patience", "0",
                   "--checkpoint-ensemble", "3", "--precision", "fp32"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"epoch-00{i}.pt" for i in range(1, 5)]
    metrics = json.loads((out / "metrics.json").read_text())
    ens = metrics["checkpoint_ensemble"]
    history = {h["epoch"]: h["val_loss"] for h in metrics["history"]}
    assert ens["epochs"] == sorted(history, key=history.get)[:3]  # the three best by val loss
    test = pd.read_parquet(out / "predictions" / "checkpoint-ensemble-test.parquet")
    assert len(test) == metrics["splits"]["test"]["n"] and "mean_auc" in ens["splits"]["test"]["summary"]
    # The mean of the three checkpoints' own probabilities.
    from finetune.checkpoint import load_classifier
    from common.images.data_config import DataConfig

    paths = {Path(p).name: p for p in sorted((SAMPLE / "images").glob("*.png"))}
    first = test["image_id"].iloc[0]
    probs = []
    for epoch in ens["epochs"]:
        model, obj = load_classifier(out / "checkpoints" / f"epoch-{epoch:03d}.pt")
        config = DataConfig.from_dict(obj["data_config"])
        with torch.no_grad():
            probs.append(torch.sigmoid(model(config.to_tensor(config.load(str(paths[first]))[None]))).numpy()[0])
    np.testing.assert_allclose(test.iloc[0][metrics["label_names"]].to_numpy(float), np.mean(probs, axis=0),
                               rtol=1e-4, atol=1e-5)
