"""Backbones from other libraries: timm's Xception and torchxrayvision's chest-X-ray DenseNet-121.

No weights can be downloaded here: each test saves random weights in the library's own format and
cache place, and the code must find and load them there (and name that file and folder when absent).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from common.models.backbones import library_model
from common.models.checkpoint import WeightsError
from common.models.inference import build_extractor
from common.models.model_registry import get_spec
from common.models.weights import library_weights_file, resolve_weights
from tests.data_paths import NIH_IMAGES, SAMPLE, needs_shared

pytestmark = pytest.mark.usefixtures("one_torch_thread")
timm = pytest.importorskip("timm")
xrv = pytest.importorskip("torchxrayvision")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TORCHXRAYVISION_HOME", str(tmp_path / "xrv"))
    return tmp_path


def _save_library_weights(name: str):
    """Random weights written where and how the library itself keeps its published ones."""
    spec = get_spec(name)
    path, _ = library_weights_file(spec)
    torch.manual_seed(7)
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if spec.family == "timm":
        model = timm.create_model(spec.library_name, pretrained=False)
        torch.save(model.state_dict(), path)  # timm's release files are plain state dicts
    elif name == "xrv-densenet121":
        model = xrv.models.DenseNet(weights=None)
        torch.save(model, path)  # torchxrayvision's DenseNet file is a pickled model
    else:
        model = library_model(spec)
        torch.save(model.state_dict(), path)  # its ResNet-50 file is the state dict of its torchvision model
    return model, path


def test_xception_input_is_timms_pretrained_cfg_without_its_imagenet_crop():
    cfg = timm.models.get_pretrained_cfg("legacy_xception").to_dict()
    config = get_spec("xception").data_config
    assert config.input_size == cfg["input_size"][1] and config.interpolation == cfg["interpolation"]
    assert config.mean == tuple(cfg["mean"]) and config.std == tuple(cfg["std"])
    assert config.crop_pct == 1.0 and config.resize == "pad"  # a radiograph keeps its edges


@pytest.mark.parametrize("name, words", [("xception", "xception-43020ad28.pth"),
                                         ("xrv-densenet121", "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"),
                                         ("xrv-resnet50", "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt")])
def test_absent_weights_name_the_file_and_the_folder(name, words, caches):
    with pytest.raises(WeightsError) as info:
        resolve_weights(name, "pretrained")
    message = str(info.value)
    folder = "torch/hub/checkpoints" if name == "xception" else "xrv"
    assert words in message and f"{caches / folder}/" in message and "\n" not in message
    if name.startswith("xrv"):
        with pytest.raises(WeightsError, match="pass --weights pretrained"):
            resolve_weights(name, "imagenet")


def test_timm_weights_in_its_cache_load_through_timm_and_the_registry(caches):
    model, path = _save_library_weights("xception")
    source = resolve_weights("xception", "pretrained")
    assert source.path == path and source.label == "imagenet:legacy_xception"
    assert resolve_weights("xception", source.label).path == path  # the label a manifest records resolves again
    by_timm = timm.create_model("legacy_xception", pretrained=True)  # timm's own loader reads the cached file
    extractor = build_extractor("xception", source.path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        by_timm.reset_classifier(0)
        torch.testing.assert_close(extractor(x), by_timm.eval()(x))


@needs_shared
def test_torchxrayvision_weights_load_and_give_its_own_features_of_its_own_input(caches):
    model, path = _save_library_weights("xrv-densenet121")
    source = resolve_weights("xrv-densenet121", "pretrained")
    assert source.path == path and source.label == "pretrained:densenet121-res224-all"
    extractor = build_extractor("xrv-densenet121", source.path)
    config = get_spec("xrv-densenet121").data_config
    png = sorted(NIH_IMAGES.glob("*.png"))[0]
    ours = config.to_tensor(config.load(str(png))[None])
    assert ours.shape == (1, 1, 224, 224) and -1024 <= ours.min() and ours.max() <= 1024
    # torchxrayvision's own preprocessing of the same file: [0, 255] -> [-1024, 1024], center crop, resize.
    with Image.open(png) as img:
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    theirs = xrv.datasets.normalize(gray, 255)[None]
    theirs = xrv.datasets.XRayResizer(224, engine="cv2")(xrv.datasets.XRayCenterCrop()(theirs)) \
        if _has_cv2() else xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(theirs))
    assert np.abs(ours[0, 0].numpy() - theirs[0]).mean() < 0.01 * 2048  # same range and field of view
    with torch.no_grad():
        torch.testing.assert_close(extractor(ours), model.eval().features2(ours), rtol=1e-4, atol=1e-4)


def _has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def test_torchxrayvision_resnet50_file_loads_in_its_own_class_and_ours_alike(caches):
    import warnings

    ours, path = _save_library_weights("xrv-resnet50")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = xrv.models.ResNet(weights="resnet50-res512-all", cache_dir=str(path.rsplit("/", 1)[0]) + "/")
    extractor = build_extractor("xrv-resnet50", resolve_weights("xrv-resnet50", "pretrained").path)
    x = torch.rand(1, 1, 512, 512) * 2048 - 1024
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), theirs.features(x), rtol=1e-4, atol=1e-4)


@needs_shared
@pytest.mark.parametrize("name, size", [("xrv-densenet121", 64), ("xception", 96), ("xrv-resnet50", 64)])
def test_a_library_backbone_fine_tunes_and_its_checkpoint_extracts(name, size, tmp_path):
    from common.images.data_config import DataConfig
    from common.models.inference import FeatureExtractor
    from finetune.checkpoint import load_classifier
    from jobs import fine_tune

    out = tmp_path / "run"
    result = fine_tune.main(["--dataset", "nih", "--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"),
                            "--images", str(SAMPLE / "images"), "--out", str(out), "--backbone", name,
                            "--weights", "random:0", "--input-size", str(size), "--batch-size", "8", "--epochs", "1",
                            "--threads", "1", "--num-workers", "0", "--split", "ratios",
                            "--early-stop-patience", "0"])
    assert result["stopped"] == "epochs"
    model, obj = load_classifier(out / "best.pt")
    config = DataConfig.from_dict(obj["data_config"])
    assert config.in_channels == get_spec(name).data_config.in_channels and config.input_size == size
    extractor = FeatureExtractor(name, str(out / "best.pt"), 0, precision="fp32", threads=1, data_config=config)
    images = np.stack([config.load(str(p)) for p in sorted((SAMPLE / "images").glob("*.png"))[:2]])
    assert extractor(images).shape == (2, get_spec(name).feature_dim)
