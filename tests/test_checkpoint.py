"""The one reader of checkpoint files: each file read once per process, into one typed record."""

import os
from dataclasses import replace

import pytest
import torch

from common.models.backbones import build_classifier
from common.models.checkpoint import FINETUNE_FORMAT, FINETUNE_FORMAT_VERSION, Checkpoint, WeightsError, read_checkpoint
from common.images.data_config import DataConfig
from common.models.inference import build_extractor

NAME = "mobilenet_v3_large"


def _finetune_file(path, n_labels=3):
    model = build_classifier(NAME, None, seed=1, n_labels=n_labels)
    torch.save({"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": NAME,
                "model_state": model.state_dict(), "label_names": list("abc")[:n_labels]}, path)
    return str(path)


def _count_loads(monkeypatch) -> list:
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: calls.append(str(f)) or load(f, *a, **k))
    return calls


def test_an_extractor_reads_its_checkpoint_file_once(tmp_path, monkeypatch):
    file = _finetune_file(tmp_path / "ft.pt")
    calls = _count_loads(monkeypatch)
    build_extractor(NAME, file)
    assert calls == [file]


def test_a_file_read_again_is_the_same_record_until_it_is_rewritten(tmp_path, monkeypatch):
    file = _finetune_file(tmp_path / "ft.pt")
    calls = _count_loads(monkeypatch)
    first = read_checkpoint(file)
    assert read_checkpoint(file).model_state is first.model_state and len(calls) == 1
    # A rewrite (as save_atomic does: another file renamed over it) is read afresh.
    _finetune_file(tmp_path / "new.pt", n_labels=2)
    os.replace(tmp_path / "new.pt", file)
    assert read_checkpoint(file).label_names == ("a", "b") and len(calls) == 2


def test_the_writer_and_the_reader_agree(tmp_path):
    model = build_classifier(NAME, None, seed=1, n_labels=2)
    written = Checkpoint(model.state_dict(), backbone=NAME, architecture="wang2017", model_options={"pooling": "max"},
                         outputs_per_label=1, feature_dim=512, label_names=("a", "b"), data_config=DataConfig(64),
                         extra={"epoch": 3, "history": [{"epoch": 1}]})
    torch.save(written.to_dict(), tmp_path / "ft.pt")
    read = read_checkpoint(tmp_path / "ft.pt", finetune=True)
    assert replace(read, path="", model_state={}) == replace(written, model_state={})
    assert read.model_state.keys() == written.model_state.keys() and read.is_architecture
    # Each reader gets its own `extra`: a resumed run appending to its history changes no other reader's.
    read.extra["history"].append({"epoch": 2})
    assert read_checkpoint(tmp_path / "ft.pt").extra["history"] == [{"epoch": 1}]


def test_only_a_fine_tune_checkpoint_where_one_is_needed(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(build_classifier(NAME, None, seed=1, n_labels=2).state_dict(), path)
    plain = read_checkpoint(path)
    assert not plain.is_finetune and plain.data_config is None
    with pytest.raises(WeightsError, match=f"^{path}: not a cxr-features/finetune version 2 checkpoint$"):
        read_checkpoint(path, finetune=True)


def test_the_extraction_driver_reads_the_checkpoint_once(tmp_path, monkeypatch):
    from jobs import extract

    model = build_classifier(NAME, None, seed=1, n_labels=2)
    file = tmp_path / "ft.pt"
    torch.save({"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": NAME,
                "model_state": model.state_dict(), "label_names": ["a", "b"], "data_config": DataConfig(64).to_dict()},
               file)
    calls = _count_loads(monkeypatch)
    # The driver reads the weights before the image table, whose missing metadata file then stops it.
    with pytest.raises(Exception, match="missing.csv: metadata file not found"):
        extract.main(["--dataset", "nih", "--metadata", str(tmp_path / "missing.csv"), "--images", str(tmp_path),
                      "--out", str(tmp_path / "store"), "--backbone", NAME, "--weights", str(file)])
    assert calls == [str(file)]


def test_weights_give_their_input_a_checkpoint_its_own_and_flags_override_either(tmp_path):
    from common.models.model_registry import get_spec
    from common.models.weights import resolve_weights, weights_data_config

    model = build_classifier(NAME, None, seed=1, n_labels=2)
    file = tmp_path / "ft.pt"
    torch.save({"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "backbone": NAME,
                "model_state": model.state_dict(), "label_names": ["a", "b"],
                "data_config": DataConfig(64, resize="crop").to_dict()}, file)
    trained, random = resolve_weights(NAME, str(file)), resolve_weights(NAME, "random:3")
    assert weights_data_config(trained, NAME) == DataConfig(64, resize="crop")
    assert weights_data_config(trained, NAME, input_size=96) == DataConfig(96, resize="crop")
    assert weights_data_config(random, NAME) == get_spec(NAME).data_config
    assert weights_data_config(random, NAME, resize="stretch") == get_spec(NAME).data_config.with_overrides(
        resize="stretch")
