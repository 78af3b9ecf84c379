"""Backbone builders: a registry name (common/models/model_registry.py) + weights -> the library model
without its head (`build_backbone`), or with a fresh N-way head to fine-tune (`build_classifier`).

Weights (finding, hashing and reading checkpoint files) are common/models/weights.py's job; the frozen
feature extractor is common/models/inference.py's `build_extractor`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from common.models.checkpoint import Checkpoint, WeightsError, first_line
from common.models.model_registry import BackboneSpec, get_spec
from common.models.weights import backbone_state, check_fits, load_weights


def library_model(spec: BackboneSpec, random_init: bool = True) -> nn.Module:
    """The full library model of `spec` (its own classifier head) without weights.

    random_init=False skips initialisation work where the constructor allows it, for a model
    whose state dict is about to be loaded.
    """
    if spec.family == "timm":
        import timm  # only timm backbones need it, and it is slow to import

        return timm.create_model(spec.library_name, pretrained=False)
    if spec.family == "torchxrayvision":
        import torchxrayvision as xrv  # as timm

        if spec.library_name.startswith("resnet50"):
            # torchxrayvision's ResNet-50 is torchvision's with one input channel and its 18 labels; its
            # constructor insists on downloading, so the same layout is built here (its file is this state dict).
            model = tvm.resnet50(weights=None, num_classes=len(xrv.models.model_urls[spec.library_name]["labels"]))
            model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            return model
        return xrv.models.DenseNet(weights=None)
    kwargs = dict(spec.random_kwargs if random_init else spec.load_kwargs)
    return tvm.get_model(spec.library_name, weights=None, **kwargs)


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module | None) -> None:
    parent_path, _, name = dotted.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def build_backbone(backbone: str, state_file: str | None, seed: int = 0) -> nn.Module:
    """The registry model without its ImageNet head, trainable: (N, 3, S, S) -> (N, feature_dim).

    The final layer (`spec.classifier`) is nn.Identity and inception's aux head is removed. With
    `state_file`, its weights are loaded (any accepted checkpoint format); without, the weights
    are random from `seed`, identical in every process that uses the same seed. The model is in
    training mode with gradients on, as torchvision builds it.
    """
    return backbone_model(backbone, load_weights(state_file, backbone) if state_file else None, seed)


def backbone_model(backbone: str, weights: Checkpoint | None, seed: int = 0) -> nn.Module:
    """`build_backbone` from weights already read (common.models.weights.load_weights), or random from `seed`."""
    spec = get_spec(backbone)
    state = backbone_state(weights, backbone) if weights is not None else None
    # fork_rng: seed the init without changing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = library_model(spec, random_init=state is None)
    _set_submodule(model, spec.classifier, nn.Identity())
    if spec.aux_classifier:
        # Only run in training mode; as torchvision does for aux_logits=False.
        _set_submodule(model, spec.aux_classifier, None)
        model.aux_logits = False
    if state is not None:
        check_fits(model, state, weights.path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{weights.path}: {first_line(exc)}") from None
    else:
        follow_weights(model)
    return model


SCRATCH_BN_MOMENTUM = 0.1


def follow_weights(model: nn.Module) -> nn.Module:
    """Raise BatchNorm momentum to SCRATCH_BN_MOMENTUM where the builder set less (MobileNetV3, EfficientNet:
    0.01, tuned for long ImageNet runs). A network trained from random weights changes fast, and running
    statistics that average ~100 steps lag so far behind it that its eval-mode outputs collapse to a
    constant (measured on Shenzhen: every val probability 0.4824, AUROC 0.50, while batch statistics gave 0.87)."""
    for m in model.modules():
        slow = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None
        if slow and m.momentum < SCRATCH_BN_MOMENTUM:
            m.momentum = SCRATCH_BN_MOMENTUM
    return model


def build_classifier(backbone: str, state_file: str | None, seed: int, n_labels: int) -> nn.Module:
    """`build_backbone` with a fresh `n_labels`-way nn.Linear at `spec.classifier`, trainable.

    This is the model a fine-tune checkpoint's `model_state` belongs to. `seed` initialises the
    new Linear (and, without `state_file`, the whole backbone).
    """
    if n_labels < 1:
        raise ValueError(f"a classifier needs at least one label, got {n_labels}")
    spec = get_spec(backbone)
    model = build_backbone(backbone, state_file, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(spec.feature_dim, n_labels)
    _set_submodule(model, spec.classifier, head)
    return model
