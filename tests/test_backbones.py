"""Backbone registry, weight resolution and loading, and the batch feature extractor.

No network: ImageNet files are stood in for by state dicts of randomly initialised models,
saved where torchvision's cache would hold them.
"""

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.models.backbones import build_classifier, library_model
from common.models.checkpoint import FINETUNE_FORMAT, FINETUNE_FORMAT_VERSION, WeightsError, read_checkpoint
from common.models.inference import build_extractor
from common.models.model_registry import REGISTRY, get_spec
from common.models.weights import resolve_weights
from common.images.data_config import DataConfig
from common.models.inference import FeatureExtractor
from tests.data_paths import NIH_IMAGES



def _source_model(name: str, seed: int = 11) -> nn.Module:
    """A full model as a checkpoint would hold it, BatchNorm statistics included."""
    torch.manual_seed(seed)
    model = library_model(get_spec(name), random_init=name != "inception_v3")  # inception's init is slow
    with torch.no_grad():
        for key, buf in model.named_buffers():
            if key.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif key.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model.eval()


def _replace(model: nn.Module, dotted: str, module: nn.Module) -> nn.Module:
    parent, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
    return model


def _reference(model: nn.Module, name: str) -> nn.Module:
    return _replace(copy.deepcopy(model), get_spec(name).classifier, nn.Identity()).eval()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _input(size: int, n: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(5))


def _save(obj, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_feature_dim_by_forward_pass(name):
    spec = get_spec(name)
    model = build_extractor(name, None, seed=0)
    out = _features(model, _input(spec.input_size, n=1, channels=spec.data_config.in_channels))
    assert out.shape == (1, spec.feature_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'resnet51': choose from densenet121, inception_v3, "):
        get_spec("resnet51")
    with pytest.raises(ValueError, match="unknown backbone"):
        resolve_weights("resnet51", "random")


def test_resolve_random():
    src = resolve_weights("resnet50", "random")
    assert (src.kind, src.path, src.seed, src.label, src.sha256) == ("random", None, 0, "random:0", None)
    src = resolve_weights("resnet50", "random:7")
    assert (src.seed, src.label) == (7, "random:7")
    with pytest.raises(WeightsError, match="random:x"):
        resolve_weights("resnet50", "random:x")


def test_resolve_missing_checkpoint(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(WeightsError, match=str(missing)):
        resolve_weights("resnet50", str(missing))


def test_download_weights_without_a_network_is_one_line_naming_the_file(monkeypatch, tmp_path, capsys):
    import urllib.error

    from jobs import extract

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHXRAYVISION_HOME", str(tmp_path / "xrv"))
    for backbone, weights, file in (("resnet50", "imagenet", "resnet50-11ad3fa6.pth"),
                                    ("xception", "pretrained", None), ("xrv-densenet121", "pretrained", None)):
        with pytest.raises(WeightsError) as err:
            resolve_weights(backbone, weights, download=True)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("--download-weights: could not download https://")
        assert "Name or service not known" in msg and "on a machine without internet, put " in msg
        if file:
            assert f"put {file} into {tmp_path / 'hub' / 'checkpoints'}/ yourself" in msg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no partial file left in the caches
    with pytest.raises(SystemExit) as info:
        extract.cli(["--config", "conf/sample.toml", "--backbone", "resnet50", "--weights", "imagenet",
                     "--download-weights", "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--download-weights: could not download" in err


def test_resolve_imagenet_offline_says_what_to_put_where(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        resolve_weights("resnet50", "imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert "put resnet50-11ad3fa6.pth (from https://download.pytorch.org/models/resnet50-11ad3fa6.pth)" in msg
    assert f"into {tmp_path / 'hub' / 'checkpoints'}/" in msg
    with pytest.raises(WeightsError, match=r"resnet50-0676ba61\.pth"):
        resolve_weights("resnet50", "imagenet:IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="has no 'IMAGENET9K'; choose from IMAGENET1K_V1, IMAGENET1K_V2"):
        resolve_weights("resnet50", "imagenet:IMAGENET9K")


def test_imagenet_file_in_cache_resolves_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    model = _source_model("resnet50")
    file = _save(model.state_dict(), cache / "resnet50-11ad3fa6.pth")

    src = resolve_weights("resnet50", "imagenet")
    assert (src.kind, src.path, src.label) == ("imagenet", file, "imagenet:IMAGENET1K_V2")
    assert src.sha256 == hashlib.sha256(Path(file).read_bytes()).hexdigest()
    assert resolve_weights("resnet50", "imagenet:DEFAULT").label == "imagenet:IMAGENET1K_V2"

    x = _input(64)
    got = _features(build_extractor("resnet50", src.path, seed=99), x)
    torch.testing.assert_close(got, _features(_reference(model, "resnet50"), x))


def test_checkpoint_formats_give_the_source_features(tmp_path):
    name = "mobilenet_v3_large"
    model = _source_model(name)
    state = model.state_dict()
    finetuned = _replace(copy.deepcopy(model), "classifier.3", nn.Linear(1280, 14))
    formats = {
        "plain": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "finetune": {
            "format": FINETUNE_FORMAT,
            "format_version": FINETUNE_FORMAT_VERSION,
            "backbone": name,
            "model_state": finetuned.state_dict(),
            "label_names": [f"label{i}" for i in range(14)],
            "epoch": 7,
        },
    }
    x = _input(64)
    want = _features(_reference(model, name), x)
    other = _features(build_extractor(name, None, seed=0), x)
    assert not torch.allclose(want, other, rtol=1e-2, atol=0)  # so equality below means the file was loaded
    for fmt, obj in formats.items():
        src = resolve_weights(name, _save(obj, tmp_path / f"{fmt}.pt"))
        assert (src.kind, src.label) == ("checkpoint", f"checkpoint:{tmp_path / f'{fmt}.pt'}")
        torch.testing.assert_close(_features(build_extractor(name, src.path), x), want, msg=fmt)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large"])
def test_classifier_is_the_backbone_with_a_trainable_n_way_linear(name, tmp_path):
    spec = get_spec(name)
    model = build_classifier(name, None, seed=3, n_labels=5)
    head = model.get_submodule(spec.classifier)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (spec.feature_dim, 5)
    assert model.training and all(p.requires_grad for p in model.parameters())
    again = build_classifier(name, None, seed=3, n_labels=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Its state dict is a fine-tune checkpoint's model_state: the extractor gives its pooled features.
    file = _save({"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": name,
                  "model_state": model.state_dict(), "label_names": list("abcde")}, tmp_path / "ft.pt")
    x = _input(64)
    torch.testing.assert_close(_features(build_extractor(name, file), x), _features(_reference(model, name), x),
                               rtol=0, atol=0)
    # Starting from that checkpoint keeps the backbone and puts a fresh head on it.
    restarted = build_classifier(name, file, seed=4, n_labels=2)
    assert restarted.get_submodule(spec.classifier).out_features == 2
    with pytest.raises(ValueError, match="at least one label"):
        build_classifier(name, None, seed=0, n_labels=0)


def test_densenet_legacy_key_names_load(tmp_path):
    # torchvision's densenet121 ImageNet file names layers 'norm.1', not 'norm1'.
    model = _source_model("densenet121")
    legacy = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # files from before these counters existed lack them
        for old in ("norm", "relu", "conv"):
            for i in "12":
                key = key.replace(f".{old}{i}.", f".{old}.{i}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    x = _input(64)
    got = _features(build_extractor("densenet121", _save(legacy, tmp_path / "d.pth")), x)
    torch.testing.assert_close(got, _features(_reference(model, "densenet121"), x))


def test_inception_loads_with_and_without_aux_head(tmp_path):
    name = "inception_v3"
    model = _source_model(name)
    assert "AuxLogits.fc.weight" in model.state_dict()
    finetuned = copy.deepcopy(model)
    finetuned.fc = nn.Linear(2048, 5)
    finetuned.AuxLogits = None  # a fine-tune built with aux_logits=False
    x = _input(80)
    want = _features(_reference(model, name), x)
    plain = _save(model.state_dict(), tmp_path / "plain.pth")
    ft = _save(
        {"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": name, "model_state": finetuned.state_dict()},
        tmp_path / "ft.pt",
    )
    for file in (plain, ft):
        extractor = build_extractor(name, file)
        assert extractor.transform_input
        torch.testing.assert_close(_features(extractor, x), want)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    name = "mobilenet_v3_large"
    state = build_extractor(name, None).state_dict()
    wrong_shape = dict(state, **{"features.0.0.weight": torch.zeros(16, 3, 5, 5)})
    foreign = library_model(get_spec("densenet121")).state_dict()
    finetune = {"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": "resnet50", "model_state": state}
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    cases = {
        "shape.pt": (wrong_shape, r"shape mismatch \(1\): features\.0\.0\.weight \(16, 3, 5, 5\) vs \(16, 3, 3, 3\)"),
        "foreign.pt": (foreign, r"missing \(\d+\): features\.0\.0\.weight.*unexpected \(\d+\): "),
        "other_backbone.pt": (finetune, "fine-tuned checkpoint is for backbone 'resnet50', not 'mobilenet_v3_large'"),
        "version.pt": (dict(finetune, format_version=1), "version 1 is not"),
        "notes.pt": (None, "cannot be read as a torch checkpoint"),
    }
    for file, (obj, pattern) in cases.items():
        path = _save(obj, tmp_path / file) if obj is not None else str(text)
        with pytest.raises(WeightsError, match=pattern) as err:
            build_extractor(name, path)
        assert str(err.value).startswith(path) and "\n" not in str(err.value), file


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    name = "mobilenet_v3_large"
    x = _input(64)
    torch.manual_seed(123)
    a = _features(build_extractor(name, None, seed=3), x)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(3))
    b = _features(build_extractor(name, None, seed=3), x)
    c = _features(build_extractor(name, None, seed=4), x)
    assert torch.equal(a, b)
    # Relative only: random mobilenet features are tiny (~1e-10), under allclose's default atol.
    assert not torch.allclose(a, c, rtol=1e-2, atol=0)


@pytest.fixture(scope="module")
def real_batch() -> np.ndarray:
    paths = sorted(NIH_IMAGES.glob("*.png"))[:4]
    if len(paths) < 4:
        pytest.skip(f"NIH images not present in {NIH_IMAGES}")
    return np.stack([DataConfig(224).load(str(p)) for p in paths])


def test_extractor_fp32_matches_model_and_bf16_is_close(real_batch):
    previous = torch.get_num_threads()
    try:
        fp32 = FeatureExtractor("resnet50", None, seed=0, precision="fp32", threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert fp32.feature_dim == 2048 and fp32.data_config == DataConfig(224)
    out = fp32(real_batch)
    assert out.shape == (4, 2048) and out.dtype == np.float32
    plain = _features(build_extractor("resnet50", None, seed=0), fp32.data_config.to_tensor(real_batch))
    np.testing.assert_allclose(out, plain.numpy(), rtol=1e-4, atol=1e-5)

    bf16 = FeatureExtractor("resnet50", None, seed=0, precision="bf16")(real_batch)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, out)  # autocast did run in bf16
    cosine = (bf16 * out).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(out, axis=1)
    assert (cosine > 0.99).all(), cosine
    # Post-ReLU features of different X-rays also have cosine > 0.99, so check as well that
    # each bf16 row is far nearer its own fp32 row than fp32 rows are to each other.
    error = np.linalg.norm(bf16 - out, axis=1)
    gaps = np.linalg.norm(out[:, None] - out[None], axis=2)
    assert error.max() < 0.2 * gaps[~np.eye(len(out), dtype=bool)].min(), (error, gaps)


def test_extractor_rejects_bad_settings():
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        FeatureExtractor("mobilenet_v3_large", None, 0, precision="fp16")
    with pytest.raises(ValueError, match="precision 'int8'"):
        FeatureExtractor("mobilenet_v3_large", None, 0, precision="int8")
    for device in ("meta", "gpu0"):
        with pytest.raises(ValueError, match=f"device '{device}': only cpu and cuda"):
            FeatureExtractor("mobilenet_v3_large", None, 0, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device 'cuda:0': torch.cuda.is_available\(\) is False"):
            FeatureExtractor("mobilenet_v3_large", None, 0, device="cuda:0")


def test_legacy_format_checkpoints_load_for_extraction_as_for_fine_tuning(tmp_path):
    # torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; one loader reads both.
    name = "mobilenet_v3_large"
    model = build_classifier(name, None, seed=1, n_labels=3)
    obj = {"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": name,
           "model_state": model.state_dict(), "label_names": list("abc"), "data_config": DataConfig(64).to_dict()}
    path = tmp_path / "legacy.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    assert read_checkpoint(str(path)).data_config == DataConfig(64)
    x = _input(64)
    torch.testing.assert_close(_features(build_extractor(name, str(path)), x), _features(_reference(model, name), x))


def test_random_weights_get_batchnorm_momentum_that_follows_training_and_loaded_weights_keep_theirs(tmp_path):
    """MobileNetV3's builder sets BatchNorm momentum 0.01: from random weights its running statistics lag so far
    behind a few hundred steps that eval-mode outputs collapse to a constant; 0.1 there. Loaded weights keep
    their builder's momentum (fine-tuning, extraction)."""
    from common.models.backbones import SCRATCH_BN_MOMENTUM, build_backbone

    def momenta(model):
        return {m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    assert momenta(library_model(get_spec("mobilenet_v3_large"))) == {0.01}  # torchvision's own
    scratch = build_classifier("mobilenet_v3_large", None, 0, 1)
    assert momenta(scratch) == {SCRATCH_BN_MOMENTUM} == {0.1}
    path = tmp_path / "mnv3.pt"
    torch.save(build_backbone("mobilenet_v3_large", None, 0).state_dict(), path)
    assert momenta(build_classifier("mobilenet_v3_large", str(path), 0, 1)) == {0.01}
    assert momenta(build_classifier("resnet50", None, 0, 1)) == {0.1}  # already 0.1: unchanged
