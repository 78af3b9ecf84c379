"""The literature's fine-tuning architectures (common/models/architectures.py): shapes, gradients, pooling
and heatmap identities by hand, the bilinear network's loss by hand, real-image training through the
fine-tune job, two-process DDP, and their checkpoints as extraction backbones."""

import json

import numpy as np
import pytest
import torch

from common.models import architectures as arch
from common.models.architectures import build_model, lse_pool, training_loss
from common.training.losses import bce, msml
from finetune.choices import MODELS
from tests.data_paths import SAMPLE, needs_shared

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW = ["wang2017", "space-attention", "attention-gated", "bilinear"]
BACKBONE = {"classifier": "densenet121", "wang2017": "densenet121", "space-attention": "densenet121", "attention-gated": "resnet50",
            "bilinear": "densenet121"}
K = 5


def _model(name, **options):
    return build_model(name, BACKBONE[name], None, 0, K, options)


def test_the_registry_and_the_flag_choices_agree():
    assert tuple(arch.ARCHITECTURES) == MODELS


@pytest.mark.parametrize("name", NEW)
def test_shapes_of_logits_pooled_features_and_heatmaps(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits = model(x)
        pooled = model.pooled(x)
        maps, map_logits = model.heatmaps(x)
    assert logits.shape == (2, K) and pooled.shape == (2, model.feature_dim)
    assert maps.shape[:2] == (2, K) and maps.ndim == 4 and min(maps.shape[2:]) >= 3
    torch.testing.assert_close(map_logits, logits)
    expected_dim = {"wang2017": 1024, "space-attention": 1024, "attention-gated": 512 + 1024 + 2048, "bilinear": 2048}
    assert model.feature_dim == expected_dim[name]


@pytest.mark.parametrize("name", NEW)
def test_gradients_reach_every_part(name):
    model = _model(name).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    loss = training_loss(model, model(x), y, torch.ones_like(y), bce)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_lse_pooling_by_hand_lies_between_mean_and_max():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])
    r = 2.0
    by_hand = np.log(np.mean(np.exp(r * np.array([0.0, 1.0, 2.0, 5.0])))) / r
    assert lse_pool(maps, r).item() == pytest.approx(by_hand, rel=1e-6)
    assert 2.0 < lse_pool(maps, r).item() < 5.0
    assert lse_pool(maps, 1e-4).item() == pytest.approx(2.0, abs=1e-3)  # r -> 0: the mean
    assert lse_pool(maps, 500.0).item() == pytest.approx(5.0, abs=0.01)  # r -> inf: the max
    assert torch.isfinite(lse_pool(maps * 1e4, 10.0)).all()  # stable where exp would overflow


@pytest.mark.parametrize("name, options", [("wang2017", {"pooling": "avg"}), ("space-attention", {})])
def test_heatmaps_average_to_the_logits_where_that_identity_holds(name, options):
    model = _model(name, **options).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        maps, logits = model.heatmaps(x)
    bias = model.classifier.bias if name == "wang2017" else 0  # space attention's bias is inside its maps
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + bias, logits, rtol=1e-4, atol=1e-5)


def test_wang2017_max_pooling_is_the_maps_maximum():
    model = _model("wang2017", pooling="max").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        t = model.transition(model.maps(x))
        torch.testing.assert_close(model.pooled(x), t.amax(dim=(2, 3)))


def test_bilinear_pooling_and_loss_by_hand():
    a = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # (1, 2, 1, 2)
    b = torch.tensor([[[[3.0, 1.0]]]])  # (1, 1, 1, 2)
    z = np.array([(1 * 3 + 2 * 1) / 2, (0 * 3 + -1 * 1) / 2])  # outer products averaged over 2 positions
    z = np.sign(z) * np.sqrt(np.abs(z))
    torch.testing.assert_close(arch.Bilinear.bilinear(a, b)[0], torch.tensor(z / np.linalg.norm(z), dtype=torch.float32))

    model = _model("bilinear", alpha=0.2, beta=0.6).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    mask = torch.ones_like(y)
    fine, s1, s2 = model(x)
    expected = 0.2 * (msml(s2, y, mask) + bce(s1, y, mask)) + 0.6 * bce(fine, y, mask)
    torch.testing.assert_close(training_loss(model, (fine, s1, s2), y, mask, bce), expected)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, K)  # predictions are the fine-grained classifier's


def test_refusals():
    with pytest.raises(ValueError, match="--model 'vit': choose from classifier, wang2017"):
        build_model("vit", "resnet50", None, 0, K)
    with pytest.raises(ValueError, match="architectures need resnet50 or densenet121"):
        build_model("wang2017", "vgg19", None, 0, K)
    with pytest.raises(ValueError, match="attention-gated: gates a ResNet"):
        build_model("attention-gated", "densenet121", None, 0, K)
    with pytest.raises(ValueError, match="pooling 'median'"):
        build_model("wang2017", "resnet50", None, 0, K, {"pooling": "median"})


# --- through the fine-tune job, on the bundled 40-image NIH sample ----------------------------------------

def _finetune(out, model, *extra):
    from jobs import fine_tune

    return fine_tune.main(["--dataset", "nih", "--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"),
                          "--images", str(SAMPLE / "images"), "--out", str(out), "--backbone", BACKBONE[model],
                          "--model", model, "--weights", "random:0", "--input-size", "64", "--batch-size", "8",
                          "--epochs", "3", "--lr", "1e-3", "--threads", "1", "--num-workers", "0",
                          "--split", "ratios", "--early-stop-patience", "0", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread):
    """3 epochs of each architecture (and the plain classifier) on the sample, CAM boxes scored on train."""
    from tests.data_paths import NIH

    root = tmp_path_factory.mktemp("architectures")
    return {name: (root / name, _finetune(root / name, name, "--bbox-list", str(NIH / "BBox_List_2017.csv"),
                                          "--localize-split", "train", "--overlays", "1"))
            for name in ["classifier", *NEW]}


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("name", NEW)
def test_a_short_real_image_run_lowers_the_loss_and_its_checkpoint_extracts(name, runs):
    from common.images.data_config import DataConfig
    from common.models.inference import FeatureExtractor
    from finetune.checkpoint import load_classifier

    out, result = runs[name]
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test" in metrics["splits"] and metrics["label_names"]
    assert metrics["localization"]["boxes"] == 2 and any(r["label"] == "all" for r in metrics["localization"]["table"])
    model, obj = load_classifier(out / "best.pt")
    assert obj["model"] == name and obj["feature_dim"] == model.feature_dim
    # --weights best.pt: the extractor gives the architecture's pooled pre-classifier features.
    extractor = FeatureExtractor(BACKBONE[name], str(out / "best.pt"), 0, precision="fp32", threads=1,
                                 data_config=DataConfig.from_dict(obj["data_config"]))
    images = np.stack([extractor.data_config.load(str(p)) for p in sorted((SAMPLE / "images").glob("*.png"))[:3]])
    with torch.no_grad():
        direct = model.pooled(extractor.data_config.to_tensor(images)).numpy()
    assert extractor.feature_dim == model.feature_dim
    np.testing.assert_allclose(extractor(images), direct, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_shared
def test_one_table_compares_the_architectures_beside_the_published_baselines(runs, tmp_path):
    import pandas as pd

    from heads import compare

    summary = compare.main([*(str(out) for out, _ in runs.values()), "--out", str(tmp_path / "cmp")])
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    table = pd.read_csv(summary["csv"])
    assert sorted(set(table["run"])) == sorted(runs) and "mean" in set(table["class"])
    assert "| model | classifier | wang2017 | space-attention | attention-gated | bilinear |" in md  # setting that differs
    assert "## Localization accuracy" in md and "| iou | 0.1 |" in md
    assert "## Published AUROC" in md and "CheXNet" in md and "Wang 2017" in md


@needs_shared
def test_heatmaps_localize_through_the_box_scorer(tmp_path):
    """evaluate_localization takes an architecture's own heatmaps (here the attention-gated map)."""
    import pandas as pd

    from finetune.localization import evaluate_localization
    from common.models.model_registry import get_spec

    model = build_model("attention-gated", "resnet50", None, 0, 2).eval()
    image = sorted((SAMPLE / "images").glob("*.png"))[0]
    boxes = pd.DataFrame({"image_id": [image.name], "label": ["Mass"], "x": [100.0], "y": [100.0],
                          "w": [824.0], "h": [824.0]})
    from common.images.data_config import DataConfig

    table = evaluate_localization(model, get_spec("resnet50"), boxes, {image.name: str(image)}, ["Mass", "Nodule"],
                                  DataConfig(64), "cpu", tmp_path, n_overlays=1)
    assert set(table["measure"]) == {"iou", "iobb"} and (tmp_path / f"{image.stem}_Mass.png").is_file()


@pytest.mark.ddp
@needs_shared
def test_two_processes_train_wang2017_to_identical_weights(tmp_path, spark):
    result = _finetune(tmp_path / "ddp", "wang2017", "--num-processes", "2", "--batch-size", "4", "--epochs", "1")
    assert result["world_size"] == 2
    digests = result["rank_state_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.slow
@needs_shared
def test_the_extraction_job_stores_an_architectures_pooled_features(runs, tmp_path, spark):
    from common.features.store import read_manifest, read_split
    from finetune.checkpoint import load_classifier
    from jobs.extract import main as extract

    out, _ = runs["attention-gated"]
    store = tmp_path / "store"
    extract(["--dataset", "nih", "--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"), "--images",
             str(SAMPLE / "images"), "--split", "ratios", "--backbone", "resnet50", "--weights", str(out / "best.pt"),
             "--precision", "fp32", "--out", str(store), "--limit", "6", "--chunk-size", "6"], spark=spark)
    manifest = read_manifest(store)
    assert manifest["model"] == "attention-gated" and manifest["feature_dim"] == 512 + 1024 + 2048
    model, obj = load_classifier(out / "best.pt")
    from common.images.data_config import DataConfig

    config = DataConfig.from_dict(manifest["data_config"])
    assert config == DataConfig.from_dict(obj["data_config"])  # the checkpoint's own input
    for split in (s for s, n in manifest["splits"].items() if n):
        data = read_split(store, split)
        paths = [next((SAMPLE / "images").glob(i)) for i in data.image_id]
        with torch.no_grad():
            direct = model.pooled(config.to_tensor(np.stack([config.load(str(p)) for p in paths]))).numpy()
        np.testing.assert_allclose(data.features, direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, backbone", [("wang2017", "xrv-densenet121"), ("attention-gated", "xrv-resnet50")])
def test_architectures_on_torchxrayvision_backbones_take_one_gray_channel(name, backbone):
    model = build_model(name, backbone, None, 0, K).eval()
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024  # torchxrayvision's range, one channel
    with torch.no_grad():
        assert model(x).shape == (2, K) and model.heatmaps(x)[0].shape[:2] == (2, K)
