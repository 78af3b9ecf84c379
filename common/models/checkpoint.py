"""The one reader of checkpoint files, into one typed record, and the fine-tune format's writer.

Every weights file this project loads goes through `read_checkpoint`: a fine-tune checkpoint
(every field of `Checkpoint`), or another library's state dict, plain or wrapped ('state_dict',
'model', DataParallel's 'module.' prefix), of which only `model_state` is known. A file is read
once per process: the records of the last few files are kept, keyed by the file's identity and
modification time, so a rewritten file is read again.

Fine-tune checkpoint format
---------------------------
A fine-tune job writes `Checkpoint.to_dict()` with torch.save:

    {
        "format": FINETUNE_FORMAT,                  # "cxr-features/finetune"
        "format_version": FINETUNE_FORMAT_VERSION,  # 2
        "backbone": "<registry name>",               # e.g. "densenet121"
        "model": "<architecture>",                   # common/models/architectures.py; absent: classifier
        "model_options": {...},                      # its options
        "outputs_per_label": 1,                      # 3 for U-MultiClass
        "feature_dim": 1024,                         # width of its pooled features
        "model_state": model.state_dict(),          # the full model
        "label_names": [...],                        # order of the N outputs
        "data_config": DataConfig.to_dict(),         # the input it was trained and evaluated on
        ...                                          # anything else: epoch, metrics, config
    }

For the plain classifier, `model` is `common.models.backbones.build_classifier(name, None, seed, N)`: the
registry's model with its final layer (the spec's `classifier` path) replaced by an N-way head.
Keys under that path, and under `aux_classifier` for inception_v3, are dropped when the checkpoint
is loaded for extraction; every other key must match the registry's model in name and shape.
Everything in the dict must load with torch.load(weights_only=True): tensors, numbers, strings,
lists and dicts only.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from common.images.data_config import DataConfig, DataConfigError
from common.models.torch_files import read_torch_file
from common.runs.command import InputError

FINETUNE_FORMAT = "cxr-features/finetune"
# 2: data_config (one input geometry for every consumer) replaced input_size.
FINETUNE_FORMAT_VERSION = 2
# Records kept: the extraction driver and a worker each need one file, a fine-tune run one or two.
CACHED_FILES = 2


class WeightsError(InputError, RuntimeError):
    """Weights that cannot be found or loaded; the message is one line."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file as a record. For another library's file only `model_state` and `path` are set.

    Records are shared by every reader of a file in the process: their tensors are read, never
    changed in place. `extra` is each reader's own copy.
    """

    model_state: Mapping[str, torch.Tensor]
    backbone: str | None = None  # the registry name; None: not a fine-tune checkpoint
    architecture: str = "classifier"  # common/models/architectures.py
    model_options: Mapping[str, Any] = field(default_factory=dict)
    outputs_per_label: int = 1
    feature_dim: int | None = None
    label_names: tuple[str, ...] = ()
    data_config: DataConfig | None = None  # None: not recorded
    extra: Mapping[str, Any] = field(default_factory=dict)  # the rest: epoch, history, config; last.pt's optimizer...
    path: str = ""

    @property
    def is_finetune(self) -> bool:
        return self.backbone is not None

    @property
    def is_architecture(self) -> bool:
        """A fine-tune of one of the literature's architectures (or U-MultiClass), not the plain classifier."""
        return self.is_finetune and (self.architecture != "classifier" or self.outputs_per_label != 1)

    def to_dict(self) -> dict:
        """The fine-tune format's dict, as torch.save writes it."""
        record = {
            "format": FINETUNE_FORMAT,
            "format_version": FINETUNE_FORMAT_VERSION,
            "backbone": self.backbone,
            "model": self.architecture,
            "model_options": dict(self.model_options),
            "outputs_per_label": self.outputs_per_label,
            "feature_dim": self.feature_dim,
            "model_state": dict(self.model_state),
            "label_names": list(self.label_names),
        }
        if self.data_config is not None:
            record["data_config"] = self.data_config.to_dict()
        return {**record, **self.extra}


_FIELDS = ("format", "format_version", "backbone", "model", "model_options", "outputs_per_label", "feature_dim",
           "model_state", "label_names", "data_config")
_cache: OrderedDict[tuple, Checkpoint] = OrderedDict()


def read_checkpoint(path: str | Path, *, finetune: bool = False) -> Checkpoint:
    """The record of the checkpoint file at `path`; with `finetune`, only a fine-tune checkpoint is
    accepted. Anything else is a one-line WeightsError naming the file."""
    path = str(path)
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        record = _cache.get(key)
        if record is None:
            obj = read_torch_file(path)
    except Exception as exc:  # unpickling errors are many-lined and of many classes
        raise WeightsError(f"{path}: cannot be read as a torch checkpoint ({first_line(exc)})") from None
    if record is None:
        record = _cache[key] = _record(obj, path)
        while len(_cache) > CACHED_FILES:
            _cache.popitem(last=False)
    if finetune and not record.is_finetune:
        raise WeightsError(f"{path}: not a {FINETUNE_FORMAT} version {FINETUNE_FORMAT_VERSION} checkpoint")
    return replace(record, extra=copy.deepcopy(record.extra)) if record.extra else record


def _record(obj: Any, path: str) -> Checkpoint:
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if "format" in obj:
        if obj["format"] != FINETUNE_FORMAT or obj.get("format_version") != FINETUNE_FORMAT_VERSION:
            raise WeightsError(
                f"{path}: checkpoint format {obj['format']!r} version {obj.get('format_version')!r} is not "
                f"{FINETUNE_FORMAT!r} version {FINETUNE_FORMAT_VERSION}"
            )
        if not isinstance(obj.get("backbone"), str):
            raise WeightsError(f"{path}: fine-tune checkpoint names no backbone")
        state = obj.get("model_state")
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):
        state = obj["model"]
    else:
        state = obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: no state dict of tensors found (plain, 'state_dict', 'model' or fine-tune format)")
    # DataParallel / DistributedDataParallel save every key under 'module.'.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "format" not in obj:
        return Checkpoint(state, path=path)
    try:
        data_config = DataConfig.from_dict(obj["data_config"], path) if "data_config" in obj else None
    except DataConfigError as exc:
        raise WeightsError(str(exc)) from None
    return Checkpoint(
        state, backbone=obj["backbone"], architecture=obj.get("model", "classifier"),
        model_options=dict(obj.get("model_options") or {}), outputs_per_label=obj.get("outputs_per_label", 1),
        feature_dim=obj.get("feature_dim"), label_names=tuple(obj.get("label_names", ())), data_config=data_config,
        extra={k: v for k, v in obj.items() if k not in _FIELDS}, path=path,
    )
