"""Backbone registry and weight loading: registry name + weights -> frozen feature extractor
(`build_extractor`), or the same model with an N-way head to fine-tune (`build_classifier`).

A backbone is a classifier whose final Linear layer is replaced by nn.Identity, so the extractor
outputs the pooled penultimate features (the input of that layer), `feature_dim` wide. It comes
from one of three libraries (`family`): torchvision's ImageNet models, timm's (Xception, which
torchvision lacks; its `pretrained_cfg` gives the input), and torchxrayvision's chest-X-ray-trained
DenseNet-121 (one gray channel in [-1024, 1024], its own 18 labels). Each keeps its library's
weights file and cache place (common/weights.py).

Weights (finding, hashing and reading checkpoint files) are common/weights.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from common.data_config import DataConfig


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    input_size: int
    constructor: Callable[..., nn.Module] | None
    # Dotted attribute path of the final Linear, replaced by nn.Identity.
    classifier: str
    default_weights: WeightsEnum | None
    # Constructor arguments for random init and for loading a state dict (see build_model).
    random_kwargs: tuple[tuple[str, Any], ...] = ()
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    # A training-only side head (inception's AuxLogits): removed from the extractor, its keys dropped.
    aux_classifier: str | None = None
    family: str = "torchvision"  # torchvision | timm | torchxrayvision
    library_name: str | None = None  # timm's model name, or torchxrayvision's weights name
    # The default input (timm: its pretrained_cfg; torchxrayvision: its crop and [-1024, 1024] range).
    input: tuple[tuple[str, Any], ...] = ()

    def build_model(self, random_init: bool = True) -> nn.Module:
        """The full library model (its own classifier head) without weights.

        random_init=False skips initialisation work where the constructor allows it, for a
        model whose state dict is about to be loaded.
        """
        if self.family == "timm":
            import timm

            return timm.create_model(self.library_name, pretrained=False)
        if self.family == "torchxrayvision":
            import torchxrayvision as xrv

            if self.library_name.startswith("resnet50"):
                # torchxrayvision's ResNet-50 is torchvision's with one input channel and its 18 labels; its
                # constructor insists on downloading, so the same layout is built here (its file is this state dict).
                model = tvm.resnet50(weights=None, num_classes=len(xrv.models.model_urls[self.library_name]["labels"]))
                model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
                return model
            return xrv.models.DenseNet(weights=None)
        kwargs = dict(self.random_kwargs if random_init else self.load_kwargs)
        return self.constructor(weights=None, **kwargs)

    @property
    def data_config(self) -> DataConfig:
        """The default input of this backbone (a checkpoint records its own)."""
        return DataConfig(self.input_size, **dict(self.input))


# aux_logits=True so ImageNet state dicts (which have AuxLogits) load; transform_input=True as
# torchvision sets it for its ImageNet weights, which expect inputs normalized to [-1, 1].
_INCEPTION_KWARGS = (("aux_logits", True), ("transform_input", True))

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet50", 2048, 224, tvm.resnet50, "fc", tvm.ResNet50_Weights.IMAGENET1K_V2),
        BackboneSpec("densenet121", 1024, 224, tvm.densenet121, "classifier", tvm.DenseNet121_Weights.IMAGENET1K_V1),
        BackboneSpec(
            "inception_v3",
            2048,
            299,
            tvm.inception_v3,
            "fc",
            tvm.Inception_V3_Weights.IMAGENET1K_V1,
            random_kwargs=_INCEPTION_KWARGS + (("init_weights", True),),
            load_kwargs=_INCEPTION_KWARGS + (("init_weights", False),),
            aux_classifier="AuxLogits",
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            1280,
            224,
            tvm.mobilenet_v3_large,
            "classifier.3",
            tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
        ),
        BackboneSpec("vgg19", 4096, 224, tvm.vgg19, "classifier.6", tvm.VGG19_Weights.IMAGENET1K_V1),
        # Chollet's Xception (Keras ImageNet weights ported by timm): timm's pretrained_cfg input (299 px,
        # bicubic, mean/std 0.5), without its ImageNet center crop (0.8975): a radiograph keeps its edges.
        BackboneSpec("xception", 2048, 299, None, "fc", None, family="timm", library_name="legacy_xception",
                     input=(("interpolation", "bicubic"), ("mean", (0.5, 0.5, 0.5)), ("std", (0.5, 0.5, 0.5)))),
        # torchxrayvision's DenseNet-121 trained on 8 chest X-ray datasets ("densenet121-res224-all"):
        # one gray channel, values x * 2048 - 1024 = (x - 0.5) / (1 / 2048), its center-crop geometry.
        BackboneSpec("xrv-densenet121", 1024, 224, None, "classifier", None, family="torchxrayvision",
                     library_name="densenet121-res224-all",
                     input=(("resize", "crop"), ("mean", (0.5,)), ("std", (1 / 2048,)), ("in_channels", 1))),
        # torchxrayvision's ResNet-50 ("resnet50-res512-all"), at its 512 px, with the same input rule.
        BackboneSpec("xrv-resnet50", 2048, 512, None, "fc", None, family="torchxrayvision",
                     library_name="resnet50-res512-all",
                     input=(("resize", "crop"), ("mean", (0.5,)), ("std", (1 / 2048,)), ("in_channels", 1))),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}: choose from {', '.join(sorted(REGISTRY))}") from None


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
    # common.weights reads this registry, so it is imported when a model is built.
    from common.weights import WeightsError, check_fits, first_line, load_state_file

    spec = get_spec(backbone)
    state = load_state_file(state_file, backbone) if state_file else None
    # fork_rng: seed the init without changing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build_model(random_init=state is None)
    _set_submodule(model, spec.classifier, nn.Identity())
    if spec.aux_classifier:
        # Only run in training mode; as torchvision does for aux_logits=False.
        _set_submodule(model, spec.aux_classifier, None)
        model.aux_logits = False
    if state is not None:
        check_fits(model, state, state_file)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{state_file}: {first_line(exc)}") from None
    return model


def build_extractor(backbone: str, state_file: str | None, seed: int = 0) -> nn.Module:
    """The frozen feature extractor: `build_backbone` in eval mode without gradients; for a fine-tune
    checkpoint of a literature architecture (common/architectures.py), its pooled features."""
    if state_file:
        from common.architectures import build_pooled_extractor, checkpoint_architecture

        arch = checkpoint_architecture(state_file)
        if arch is not None:
            return build_pooled_extractor(backbone, state_file, arch)
    model = build_backbone(backbone, state_file, seed)
    model.eval()
    model.requires_grad_(False)
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
