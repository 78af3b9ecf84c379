"""The backbone registry: one plain-data spec per registry name, and nothing that builds a model.

A backbone is a classifier whose final Linear layer is replaced by nn.Identity, so the extractor
outputs the pooled penultimate features (the input of that layer), `feature_dim` wide. It comes
from one of three libraries (`family`): torchvision's ImageNet models, timm's (Xception, which
torchvision lacks; its `pretrained_cfg` gives the input), and torchxrayvision's chest-X-ray-trained
DenseNet-121 (one gray channel in [-1024, 1024], its own 18 labels). Each keeps its library's
weights file and cache place (common/models/weights.py); common/models/backbones.py builds the models.

Like timm's `_registry` and `pretrained_cfg`, a spec names things and imports no torch: which
library model, which published weights, where the classifier is, the default input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.images.data_config import DataConfig


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    input_size: int
    # The library's model name: torchvision's builder (torchvision.models.get_model), timm's model,
    # or torchxrayvision's weights.
    library_name: str
    # Dotted attribute path of the final Linear, replaced by nn.Identity.
    classifier: str
    # torchvision: the member of the model's weights enum that 'imagenet' means; None elsewhere.
    default_weights: str | None = None
    # Constructor arguments for random init and for loading a state dict (common/models/backbones.py).
    random_kwargs: tuple[tuple[str, Any], ...] = ()
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    # A training-only side head (inception's AuxLogits): removed from the extractor, its keys dropped.
    aux_classifier: str | None = None
    family: str = "torchvision"  # torchvision | timm | torchxrayvision
    # The default input (timm: its pretrained_cfg; torchxrayvision: its crop and [-1024, 1024] range).
    input: tuple[tuple[str, Any], ...] = ()

    @property
    def data_config(self) -> DataConfig:
        """The default input of this backbone (a checkpoint records its own)."""
        return DataConfig(self.input_size, **dict(self.input))


# aux_logits=True so ImageNet state dicts (which have AuxLogits) load; transform_input=True as
# torchvision sets it for its ImageNet weights, which expect inputs normalized to [-1, 1].
_INCEPTION_KWARGS = (("aux_logits", True), ("transform_input", True))
# torchxrayvision's input: one gray channel, values x * 2048 - 1024 = (x - 0.5) / (1 / 2048), center crop.
_XRV_INPUT = (("resize", "crop"), ("mean", (0.5,)), ("std", (1 / 2048,)), ("in_channels", 1))

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet50", 2048, 224, "resnet50", "fc", "IMAGENET1K_V2"),
        BackboneSpec("densenet121", 1024, 224, "densenet121", "classifier", "IMAGENET1K_V1"),
        BackboneSpec(
            "inception_v3",
            2048,
            299,
            "inception_v3",
            "fc",
            "IMAGENET1K_V1",
            random_kwargs=_INCEPTION_KWARGS + (("init_weights", True),),
            load_kwargs=_INCEPTION_KWARGS + (("init_weights", False),),
            aux_classifier="AuxLogits",
        ),
        BackboneSpec("mobilenet_v3_large", 1280, 224, "mobilenet_v3_large", "classifier.3", "IMAGENET1K_V2"),
        BackboneSpec("vgg19", 4096, 224, "vgg19", "classifier.6", "IMAGENET1K_V1"),
        # Chollet's Xception (Keras ImageNet weights ported by timm): timm's pretrained_cfg input (299 px,
        # bicubic, mean/std 0.5), without its ImageNet center crop (0.8975): a radiograph keeps its edges.
        BackboneSpec("xception", 2048, 299, "legacy_xception", "fc", family="timm",
                     input=(("interpolation", "bicubic"), ("mean", (0.5, 0.5, 0.5)), ("std", (0.5, 0.5, 0.5)))),
        # torchxrayvision's DenseNet-121 trained on 8 chest X-ray datasets, at its 224 px.
        BackboneSpec("xrv-densenet121", 1024, 224, "densenet121-res224-all", "classifier", family="torchxrayvision",
                     input=_XRV_INPUT),
        # torchxrayvision's ResNet-50, at its 512 px, with the same input rule.
        BackboneSpec("xrv-resnet50", 2048, 512, "resnet50-res512-all", "fc", family="torchxrayvision",
                     input=_XRV_INPUT),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}: choose from {', '.join(sorted(REGISTRY))}") from None
