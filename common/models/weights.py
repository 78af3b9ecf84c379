"""Weights: a --weights value -> a local file (or a seed), and a weights file -> a backbone's state dict.

Weights are named by a string (the job's --weights flag), resolved once on the driver by
`resolve_weights` into a `WeightsSource` (a local file, or a seed), and loaded on every worker
by `load_weights` (common/models/checkpoint.py reads the file). Nothing here downloads unless asked to:
a machine without internet gets a one-line error saying which file to put where.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights

from common.images.data_config import DataConfig
from common.models.checkpoint import Checkpoint, WeightsError, first_line, read_checkpoint
from common.models.model_registry import BackboneSpec, get_spec

@dataclass(frozen=True)
class WeightsSource:
    kind: str  # 'imagenet' | 'checkpoint' | 'random'
    path: str | None  # absolute local file to load; None for random
    seed: int  # the init seed for random; 0 otherwise
    label: str  # for the manifest: imagenet:<ENUM>, checkpoint:/abs/path, random:<seed>
    sha256: str | None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def imagenet_cache_path(weights: WeightsEnum) -> str:
    """Where torch.hub (and so torchvision) caches this weights file; honours $TORCH_HOME."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def resolve_weights(backbone: str, weights: str, download: bool = False) -> WeightsSource:
    """Turn a --weights value into a local file (or a seed), checking it exists.

    Accepted: 'imagenet' (the backbone's default torchvision weights), 'imagenet:<ENUM_NAME>',
    'pretrained' (a timm or torchxrayvision backbone's published weights; ImageNet's for torchvision),
    'random' or 'random:<seed>' (seed 0 by default), or the path of a checkpoint file.
    """
    spec = get_spec(backbone)
    if weights == "random" or weights.startswith("random:"):
        text = weights.partition(":")[2] or "0"
        if not (text.isascii() and text.isdigit()):
            raise WeightsError(f"--weights {weights!r}: the seed after 'random:' must be a non-negative integer")
        seed = int(text)
        return WeightsSource("random", None, seed, f"random:{seed}", None)

    kind, _, name = weights.partition(":")
    if spec.family != "torchvision" and kind in ("imagenet", "pretrained") and name in ("", spec.library_name):
        return _library_weights(spec, kind, download)  # also the label a manifest recorded
    if weights == "pretrained":
        weights = "imagenet"  # a torchvision backbone's published weights are ImageNet's
    if weights == "imagenet" or weights.startswith("imagenet:"):
        if spec.default_weights is None:
            raise WeightsError(f"--weights {weights!r}: {backbone} has no torchvision weights enum; use 'pretrained'")
        enum_cls = get_model_weights(spec.library_name)
        name = weights.partition(":")[2]
        if not name:
            enum = enum_cls[spec.default_weights]
        elif name in enum_cls.__members__:
            # DEFAULT is an alias: .name gives the canonical member, which is what the label records.
            enum = enum_cls[name]
        else:
            raise WeightsError(
                f"--weights {weights!r}: {enum_cls.__name__} has no {name!r}; choose from {', '.join(enum_cls.__members__)}"
            )
        path = imagenet_cache_path(enum)
        if not os.path.isfile(path):
            if not download:
                file = os.path.basename(path)
                raise WeightsError(
                    f"ImageNet weights for {backbone} ({enum}) are not in the cache: put {file} (from {enum.url}) "
                    f"into {os.path.dirname(path)}/ (set $TORCH_HOME to use another cache), "
                    f"pass --download-weights on a machine with internet, or pass a checkpoint path"
                )
            download_file(enum.url, path, check_hash=True)
        return WeightsSource("imagenet", path, 0, f"imagenet:{enum.name}", file_sha256(path))

    path = os.path.abspath(os.path.expanduser(weights))
    if not os.path.isfile(path):
        raise WeightsError(
            f"--weights {weights!r}: no checkpoint file at {path} "
            f"(accepted: imagenet, imagenet:<ENUM>, random, random:<seed>, or a checkpoint path)"
        )
    return WeightsSource("checkpoint", path, 0, f"checkpoint:{path}", file_sha256(path))


def download_file(url: str, path: str, check_hash: bool = False) -> None:
    """--download-weights: `url` into exactly `path` (the library's cache), as torch.hub downloads it (a
    temporary file renamed when complete; with check_hash, the hash prefix in the file name is checked, as
    torchvision does). No network, a refused URL or a bad hash is one WeightsError line."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(path)) if check_hash else None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=True)
    except Exception as exc:  # URLError, HTTPError, socket timeouts, the hash check's RuntimeError, a full disk
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())[:200]
        raise WeightsError(f"--download-weights: could not download {url} ({reason}); on a machine without "
                           f"internet, put {os.path.basename(path)} into {os.path.dirname(path)}/ yourself") from None


def library_weights_file(spec: BackboneSpec) -> tuple[str, str]:
    """(local path, source URL) of a timm or torchxrayvision backbone's published weights, in the
    library's own cache: torch.hub's checkpoints folder for timm (where its load_state_dict_from_url
    looks), torchxrayvision's models_data folder ($TORCHXRAYVISION_HOME overrides it)."""
    if spec.family == "timm":
        import timm

        url = timm.models.get_pretrained_cfg(spec.library_name).url
        return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)), url
    import torchxrayvision as xrv

    url = xrv.models.model_urls[spec.library_name]["weights_url"]
    folder = os.environ.get("TORCHXRAYVISION_HOME") or xrv.utils.get_cache_dir()
    return os.path.join(os.path.expanduser(folder), os.path.basename(url)), url


def _library_weights(spec: BackboneSpec, weights: str, download: bool) -> WeightsSource:
    if weights == "imagenet" and spec.family == "torchxrayvision":
        raise WeightsError(f"--weights imagenet: {spec.name}'s published weights are torchxrayvision's chest X-ray "
                           "ones; pass --weights pretrained")
    path, url = library_weights_file(spec)
    if not os.path.isfile(path):
        if not download:
            raise WeightsError(
                f"{spec.family} weights for {spec.name} ({spec.library_name}) are not in the cache: put "
                f"{os.path.basename(path)} (from {url}) into {os.path.dirname(path)}/, pass --download-weights on "
                "a machine with internet, or pass a checkpoint path")
        download_file(url, path)
    kind = "imagenet" if spec.family == "timm" else "pretrained"
    return WeightsSource(kind, path, 0, f"{kind}:{spec.library_name}", file_sha256(path))


# torchvision's DenseNet checkpoints keep pre-0.4 key names ('norm.1' for 'norm1'); torchvision
# renames them with this pattern when it loads its own weights, so we do the same.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def load_weights(path: str, backbone: str) -> Checkpoint:
    """The weights file at `path` for `backbone`, read once (common/models/checkpoint.py); a fine-tune
    checkpoint of another backbone is refused. torchxrayvision's DenseNet file is a pickled model,
    which only its own loader (a full unpickle of a file in its cache) reads: the model is built
    through it and its state taken. (Its ResNet-50 file is a plain state dict.)"""
    spec = get_spec(backbone)
    if spec.name == "xrv-densenet121" and os.path.abspath(path) == os.path.abspath(library_weights_file(spec)[0]):
        return Checkpoint(_torchxrayvision_state(spec, path), path=path)
    weights = read_checkpoint(path)
    if weights.is_finetune and weights.backbone != backbone:
        raise WeightsError(f"{path}: fine-tuned checkpoint is for backbone {weights.backbone!r}, not {backbone!r}")
    return weights


def weights_data_config(weights: WeightsSource, backbone: str, input_size: int | None = None,
                        resize: str | None = None) -> DataConfig:
    """The input a model of `backbone` with `weights` takes: a fine-tune checkpoint's own (what it was trained on),
    else the backbone's; --input-size / --resize (`input_size`, `resize`) override either."""
    trained = load_weights(weights.path, backbone).data_config if weights.kind == "checkpoint" else None
    return (trained or get_spec(backbone).data_config).with_overrides(input_size, resize)


def backbone_state(weights: Checkpoint, backbone: str) -> dict[str, torch.Tensor]:
    """The state dict of `backbone` without its head: classifier (and aux head) keys dropped,
    densenet121's old key names renamed."""
    spec = get_spec(backbone)
    drop = tuple(f"{p}." for p in (spec.classifier, spec.aux_classifier) if p)
    out = {}
    for key, value in weights.model_state.items():
        if key.startswith(drop):
            continue
        if backbone == "densenet121" and (m := _DENSENET_OLD_KEY.match(key)):
            key = m.group(1) + m.group(2)
        out[key] = value
    return out


def _torchxrayvision_state(spec: BackboneSpec, path: str) -> dict[str, torch.Tensor]:
    import torchxrayvision as xrv  # slow to import; only its backbones need it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = xrv.models.DenseNet(weights=spec.library_name, cache_dir=os.path.dirname(path) + os.sep)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise WeightsError(f"{path}: torchxrayvision cannot load it ({first_line(exc)})") from None
    # op_threshs calibrates its own 18 outputs, which the registry model does not have (its head is replaced).
    return {k: v for k, v in model.state_dict().items() if k != "op_threshs"}


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """One-line error naming the first few keys that do not fit, before load_state_dict's long one."""
    expected = model.state_dict()
    # BatchNorm counters do not affect eval, and old checkpoints lack them; load_state_dict fills them.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    if problems:
        raise WeightsError(f"{path}: does not fit the model: {'; '.join(problems)}")


