"""Class activation maps (Zhou et al. 2016) of the models: for a network that ends in global average pooling
and one Linear layer, the map of class k is CAM_k(i, j) = sum_c w_kc * F_c(i, j) over the last convolutional
feature maps F; its spatial mean plus the bias b_k is exactly the logit of class k, so the map shows where the
evidence for the logit lies. The literature's architectures give their own heatmaps; `heatmap_fn` picks.
`map_to_grid` carries maps from a model's input back onto the original image's pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.images.data_config import DataConfig
from common.models.architectures import ThreeWay, is_architecture
from common.models.model_registry import BackboneSpec


@dataclass(frozen=True)
class CamLayer:
    module: str  # dotted path of the module that outputs the last feature maps before pooling
    relu: bool  # the model's forward applies a ReLU to that output before pooling


# Each of these ends in global average pooling and one Linear (dropout in between is a no-op in eval).
CAM_LAYERS = {
    "resnet50": CamLayer("layer4", relu=False),
    # DenseNet.forward: F.relu(self.features(x)) -> adaptive_avg_pool2d -> classifier. torchvision's
    # ReLU is in place, so the hooked tensor is rectified by the time forward returns; applying it
    # again costs little and keeps the maps right should that ReLU stop being in place.
    "densenet121": CamLayer("features", relu=True),
    "inception_v3": CamLayer("Mixed_7c", relu=False),
    "xception": CamLayer("act4", relu=False),  # timm's forward_features ends conv4 -> bn4 -> act4 (ReLU)
    "xrv-densenet121": CamLayer("features", relu=True),  # features2: relu(features) -> pool
    "xrv-resnet50": CamLayer("layer4", relu=False),
}
_NO_CAM = {
    "vgg19": "its classifier is three Linear layers on the flattened 7x7 map, not pooling and one Linear",
    "mobilenet_v3_large": "its classifier's first Linear mixes the pooled features before the last one",
}


class CamModel:
    """A registry model whose final layer (`spec.classifier`) is a K-way Linear, seen as CAM needs it.

    Calling it runs one forward pass and returns (feature_maps (N, C, h, w), logits (N, K)). The
    hook is registered for that call only, so the wrapped model is left as it was, and a
    fine-tune job can keep training it.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        if spec.name in _NO_CAM:
            raise ValueError(
                f"CAM is not defined for {spec.name}: CAM needs a single linear layer after global pooling; "
                f"{_NO_CAM[spec.name]}"
            )
        if spec.name not in CAM_LAYERS:
            raise ValueError(f"no CAM layer known for backbone {spec.name!r}: choose from {', '.join(CAM_LAYERS)}")
        self.model = model
        self.spec = spec
        self.layer = CAM_LAYERS[spec.name]
        self._feature_module = model.get_submodule(self.layer.module)
        _linear_head(model, spec)  # fail now, not at the first batch, if the head is not one Linear

    @property
    def classifier(self) -> nn.Linear:
        # Looked up on every use: a job may swap the head after wrapping.
        return _linear_head(self.model, self.spec)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured = []
        handle = self._feature_module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.model(x)
        finally:
            handle.remove()
        # inception_v3 in training mode returns (logits, aux_logits).
        logits = out.logits if hasattr(out, "logits") else out
        features = captured[-1]
        if self.layer.relu:
            features = F.relu(features)
        if features.shape[1] != self.classifier.in_features:
            raise ValueError(
                f"{self.spec.name}: {self.layer.module} gives {features.shape[1]} channels, "
                f"the classifier takes {self.classifier.in_features}"
            )
        return features, logits


def _linear_head(model: nn.Module, spec: BackboneSpec) -> nn.Linear:
    head = model.get_submodule(spec.classifier)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{spec.name}: CAM needs a single linear layer after global pooling; "
            f"{spec.classifier} is a {type(head).__name__}"
        )
    return head


def heatmap_fn(model: nn.Module, spec: BackboneSpec):
    """x -> (maps (N, K, h, w), logits (N, K)) of a fine-tuned model: the architecture's own heatmaps
    (common/models/architectures.py), or the plain classifier's CAM; a ValueError where it has none."""
    if isinstance(model, ThreeWay):  # U-MultiClass: the map of z+ - z-, as CAM is linear in the logits
        inner = heatmap_fn(model.inner, spec)

        def differences(x):
            maps, logits = inner(x)
            maps = maps.view(maps.shape[0], -1, 3, *maps.shape[2:])
            logits = logits.view(logits.shape[0], -1, 3)
            return maps[:, :, 2] - maps[:, :, 0], logits[..., 2] - logits[..., 0]

        return differences
    if is_architecture(model):
        return model.heatmaps
    cam = CamModel(model, spec)

    def maps(x):
        features, logits = cam(x)
        return class_activation_maps(features, cam.classifier.weight), logits

    return maps


def cam_model(model: nn.Module, spec: BackboneSpec) -> CamModel:
    """Wrap `model` (library_model(spec) with a K-way Linear at spec.classifier) for CAM."""
    return CamModel(model, spec)


def class_activation_maps(
    feature_maps: torch.Tensor, classifier_weight: torch.Tensor, classes: Sequence[int] | None = None
) -> torch.Tensor:
    """(N, C, h, w) feature maps, (K, C) Linear weight -> (N, K', h, w) maps for `classes` (all if None).

    The bias is left out: it is constant over space, so it moves a map's level but not its
    shape, and min-max normalization (cam_to_boxes) removes it anyway.
    """
    if feature_maps.ndim != 4 or classifier_weight.ndim != 2 or feature_maps.shape[1] != classifier_weight.shape[1]:
        raise ValueError(
            f"expected feature maps (N, C, h, w) and weight (K, C), got {tuple(feature_maps.shape)} "
            f"and {tuple(classifier_weight.shape)}"
        )
    weight = classifier_weight if classes is None else classifier_weight[list(classes)]
    return torch.einsum("kc,nchw->nkhw", weight.to(feature_maps.dtype), feature_maps)


def map_to_grid(cams: torch.Tensor, data_config: DataConfig, grid: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) maps over the model's input -> (K, H, W) over the original image's `grid` (W, H).

    Each grid pixel's center is carried into input coordinates by the data config's placement
    and the map is read there bilinearly, as upsampling it to the input size would give. Grid
    pixels the input does not show (cut by a crop) get the map's minimum: no evidence.
    """
    width, height = grid
    place = data_config.placement(width, height)
    xs, ys = place.to_input(np.arange(width) + 0.5, np.arange(height) + 0.5)
    size = data_config.input_size
    # grid_sample's [-1, 1] spans the input's outer pixel edges (align_corners=False).
    gx = torch.as_tensor(xs / size * 2 - 1, dtype=torch.float32, device=cams.device)
    gy = torch.as_tensor(ys / size * 2 - 1, dtype=torch.float32, device=cams.device)
    where = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    maps = cams.to(torch.float32)[None]
    out = F.grid_sample(maps, where, mode="bilinear", padding_mode="border", align_corners=False)[0]
    outside = (where.abs() > 1).any(dim=-1)[0]
    if outside.any():
        out = torch.where(outside, maps.flatten(2).amin(dim=2)[0][:, None, None], out)
    return out
