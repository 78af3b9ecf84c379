"""heads.ensemble: runs' predictions combined; checks of labels, images and ground truth; real head runs."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.runs import rundir
from heads import compare, ensemble, train
from tests.heads_fixtures import synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["Atelectasis", "Effusion", "Mass"]


def test_combine_by_hand():
    a, b = np.array([[0.2, 0.9]]), np.array([[0.6, 0.5]])
    np.testing.assert_allclose(ensemble.combine([a, b], "prob"), [[0.4, 0.7]])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(np.array([0.2, 0.9])) + logit(np.array([0.6, 0.5]))) / 2))
    np.testing.assert_allclose(ensemble.combine([a, b], "logit")[0], expected)


def _member(root, name, y, noise_seed, n_images=None, flip=None):
    """A finished run whose probabilities are the truth plus its own independent noise."""
    rng = np.random.default_rng(noise_seed)
    out = rundir.prepare(root / name, overwrite=False, kind="head", log=lambda m: None)
    splits = {}
    for split, truth in y.items():
        truth = truth if flip is None or split != "test" else np.where(np.arange(len(truth))[:, None] == 0, 1 - truth, truth)
        n = len(truth) if n_images is None else min(n_images, len(truth))
        probs = 1 / (1 + np.exp(-(2.0 * truth[:n] - 1 + rng.normal(0, 1.5, truth[:n].shape))))
        frame = rundir.predictions_frame([f"{split}_{i:04d}" for i in range(n)], probs, NAMES, truth[:n],
                                         np.ones_like(truth[:n], bool), truth[:n].any(1), ~truth[:n].any(1))
        rundir.write_table(frame, out / rundir.PREDICTIONS / f"{split}.parquet")
        splits[split] = {"summary": {"mean_auc": float(np.mean([roc_auc_score(truth[:n, j], probs[:, j])
                                                              for j in range(len(NAMES))]))}}
    rundir.write_json(out / rundir.METRICS, {"label_names": NAMES, "splits": splits})
    rundir.write_json(out / rundir.CONFIG, {"settings": {"init_seed": noise_seed}, "dataset": "nih"})
    return out


@pytest.fixture
def truth():
    rng = np.random.default_rng(0)
    return {s: (rng.random((n, len(NAMES))) < 0.3).astype(np.float32) for s, n in (("val", 300), ("test", 400))}


def test_an_ensemble_of_independent_noise_scores_better_than_each_member(tmp_path, truth):
    members = [_member(tmp_path, f"m{i}", truth, seed) for i, seed in enumerate((1, 2, 3, 4, 5))]
    summary = ensemble.main([*map(str, members), "--out", str(tmp_path / "ens"), "--bootstrap-draws", "0"])
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    member_aucs = [m["test_mean_auc"] for m in metrics["members"]]
    assert summary["test_mean_auc"] > max(member_aucs) + 0.02, (summary, member_aucs)
    assert json.loads((tmp_path / "ens" / ".cxr-run.json").read_text())["kind"] == "ensemble"
    assert "Ensemble of 5 runs (prob mean)" in (tmp_path / "ens" / "report.md").read_text()
    logit = ensemble.main([*map(str, members), "--out", str(tmp_path / "ens-logit"), "--combine", "logit",
                           "--bootstrap-draws", "0"])
    assert logit["test_mean_auc"] > max(member_aucs)
    compare.main([str(tmp_path / "ens"), str(tmp_path / "ens-logit"), "--out", str(tmp_path / "cmp")])
    assert "| combine | prob | logit |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_members_must_share_images_ground_truth_and_labels(tmp_path, truth, capsys):
    good = _member(tmp_path, "good", truth, 1)

    def refused(*argv):
        with pytest.raises(SystemExit) as exit_:
            ensemble.cli([*argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and not (tmp_path / "x").exists()
        return err

    fewer = _member(tmp_path, "fewer", truth, 2, n_images=350)
    assert "images are not those of" in refused(str(good), str(fewer))
    relabelled = _member(tmp_path, "relabelled", truth, 3, flip=True)
    assert "ground truth differs" in refused(str(good), str(relabelled))
    other = _member(tmp_path, "other", truth, 4)
    metrics = json.loads((other / "metrics.json").read_text())
    rundir.write_json(other / "metrics.json", {**metrics, "label_names": NAMES[::-1]})
    assert "labels" in refused(str(good), str(other))
    assert "two or more runs" in refused(str(good))
    assert "not a run directory" in refused(str(good), str(tmp_path))


def test_real_head_runs_ensemble_with_patient_level_intervals(tmp_path):
    store = synthetic_store(tmp_path / "store", dim=32, signal=1.0, seed=0)
    runs = []
    for seed in (0, 1, 2):
        runs.append(tmp_path / f"head{seed}")
        train.main(["--store", str(store), "--out", str(runs[-1]), "--init-seed", str(seed), "--head", "mlp3-dropout",
                    "--epochs", "8", "--threads", "1", "--quiet", "--bootstrap-draws", "0"])
    ensemble.main([*map(str, runs), "--out", str(tmp_path / "ens"), "--bootstrap-draws", "200"])
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    test = metrics["splits"]["test"]
    assert test["summary"]["mean_auc_ci_low"] <= test["summary"]["mean_auc"] <= test["summary"]["mean_auc_ci_high"]
    assert not any("resample images" in n for n in metrics["notes"])  # patients came from the stores
    members = [m["test_mean_auc"] for m in metrics["members"]]
    assert test["summary"]["mean_auc"] >= min(members)


def test_a_grids_top_cells_kept_as_one_head(tmp_path, capsys):
    import pandas as pd

    from heads.checkpoint import load_head
    from heads.models import HeadEnsemble
    from heads.predictions import predict_stores

    store = synthetic_store(tmp_path / "store", dim=32, signal=1.0, seed=0)
    out = tmp_path / "grid"
    args = ["--store", str(store), "--epochs", "5", "--threads", "1", "--quiet", "--bootstrap-draws", "0",
            "--precision", "fp32", "--grid-lr", "1e-3,3e-3", "--grid-weight-decay", "0,1e-4"]
    train.main([*args, "--out", str(out), "--grid-ensemble", "3"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(c["ensemble_rank"] for c in metrics["grid"] if "ensemble_rank" in c) == [1, 2, 3]
    head = load_head(out)
    assert isinstance(head.model, HeadEnsemble) and len(head.model.members) == 3
    saved = pd.read_parquet(out / "predictions" / "test.parquet")
    again = predict_stores(head, None, ["test"], "fp32").set_index("image_id").loc[saved["image_id"]]
    np.testing.assert_allclose(again[head.label_names].to_numpy(), saved[head.label_names].to_numpy(), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(SystemExit):
        train.cli([*args, "--out", str(tmp_path / "bad"), "--grid-ensemble", "5"])
    assert "--grid-ensemble 5: between 1 and the grid's 4 cell(s)" in capsys.readouterr().err


def test_an_ensemble_never_overwrites_or_repeats_a_member(tmp_path, truth, capsys):
    a, b = _member(tmp_path, "a", truth, 1), _member(tmp_path, "b", truth, 2)
    (b / "head.pt").write_text("weights")
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    for argv, line in (
            ([str(a), str(b), "--out", str(b), "--overwrite"],
             f"--out {b}: is an input of this command ({b}); write the result to another folder"),
            ([str(a), f"{tmp_path}/./a", "--out", str(tmp_path / "e")],
             f"{tmp_path}/./a: the same run as {a}; an ensemble needs two or more different runs")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            ensemble.cli([*argv, "--bootstrap-draws", "0"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and err.rstrip().endswith(line), err
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    assert not (tmp_path / "e").exists()


def test_report_re_renders_an_ensemble(tmp_path, truth):
    from heads import report

    members = [_member(tmp_path, f"m{i}", truth, seed) for i, seed in enumerate((1, 2))]
    ensemble.main([*map(str, members), "--out", str(tmp_path / "ens"), "--bootstrap-draws", "0"])
    written = (tmp_path / "ens" / rundir.REPORT).read_text()
    (tmp_path / "ens" / rundir.REPORT).unlink()
    report.main(["--run", str(tmp_path / "ens")])
    assert (tmp_path / "ens" / rundir.REPORT).read_text() == written
