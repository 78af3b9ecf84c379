"""The literature's fine-tuning architectures on a registry backbone, beside the plain classifier.

Every new model here is one nn.Module with the same small interface, so fine-tuning, evaluation,
the extraction job (a checkpoint as --weights), CAM localization and the diagnosis service treat
them alike:

    model(x)            logits (N, K); in training mode a model may return more (see `training_loss`)
    model.pooled(x)     the pooled pre-classifier features (N, feature_dim): what extraction stores
    model.heatmaps(x)   (maps (N, K, h, w), logits (N, K))
    model.training_loss(outputs, y, mask, loss_fn)   the architecture's loss on model(x)'s outputs
    model.backbone_parts   the pretrained modules (--freeze-backbone freezes them)

`classifier`, today's model, stays the plain torchvision module common.models.backbones.build_classifier
makes (its checkpoints and the extraction of their features are unchanged); `training_loss` and
`is_architecture` below treat it alongside.

| name | model | pooled features | heatmaps |
| --- | --- | --- | --- |
| `classifier` | backbone -> global average pool -> Linear (common.models.backbones.build_classifier) | backbone features | CAM (common/models/cam.py) |
| `wang2017` | Wang et al. 2017: maps -> transition 1x1 conv -> avg/max/LSE pool -> Linear | the pooled transition vector | transition maps weighted by the Linear (CAM) |
| `space-attention` | maps + their global context tiled at every position -> one conv -> S x S x K map; scores = its average | the context vector | the S x S x K map itself |
| `attention-gated` | ResNet with Schlemper et al.'s attention gates after stages 2 and 3 | attended stage-2, stage-3 vectors and the global one, concatenated | the stage-2 attention map (class-agnostic) |
| `bilinear` | Ge et al. 2018: two streams of one backbone, bilinear pooling, CE + MSML + fine-grained CE | both streams' pooled vectors, concatenated | stream 1's CAM |

The new architectures need a backbone whose last feature maps are known: resnet50 and densenet121
(attention-gated: resnet50, whose stages it gates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.models.backbones import build_backbone, build_classifier
from common.models.checkpoint import Checkpoint, WeightsError, first_line
from common.choices import ARCHITECTURE_LAYOUTS
from common.training.losses import msml, multiclass_ce
from common.models.model_registry import get_spec
from common.models.weights import check_fits


def lse_pool(maps: torch.Tensor, r: float) -> torch.Tensor:
    """Log-sum-exp pooling over positions (Wang et al. 2017): (1/r) log(mean exp(r x)), between mean
    (r -> 0) and max (r -> inf); computed stably."""
    flat = maps.flatten(2)
    return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r


def pool(maps: torch.Tensor, how: str, r: float = 10.0) -> torch.Tensor:
    if how == "avg":
        return maps.mean(dim=(2, 3))
    if how == "max":
        return maps.amax(dim=(2, 3))
    if how == "lse":
        return lse_pool(maps, r)
    raise ValueError(f"pooling {how!r}: choose avg, max or lse")


LAYOUTS = ARCHITECTURE_LAYOUTS


class FeatureMaps(nn.Module):
    """A registry backbone up to its last feature maps (N, C, h, w), and for ResNet its stages."""

    STAGES = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, backbone: str, state_file: str | None, seed: int):
        super().__init__()
        if backbone not in LAYOUTS:
            raise ValueError(f"--backbone {backbone}: the literature architectures need resnet50 or densenet121 "
                             f"(or {', '.join(b for b in LAYOUTS if b.startswith('xrv'))}: backbones whose last "
                             "feature maps this project knows)")
        self.name = LAYOUTS[backbone]
        self.net = build_backbone(backbone, state_file, seed)
        self.channels = get_spec(backbone).feature_dim

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """ResNet: each stage's output; DenseNet: {'last': rectified final maps}."""
        n = self.net
        if self.name == "densenet121":
            return {"last": F.relu(n.features(x))}
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        out = {}
        for stage in self.STAGES:
            x = getattr(n, stage)(x)
            out[stage] = x
        out["last"] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)["last"]


class Wang2017(nn.Module):
    """Wang et al. 2017: transition layer, global pooling (avg, max or LSE with r), prediction layer."""

    def __init__(self, backbone: str, state_file, seed: int, n_labels: int, transition: int = 1024,
                 pooling: str = "lse", lse_r: float = 10.0):
        super().__init__()
        self.maps = FeatureMaps(backbone, state_file, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transition = nn.Conv2d(self.maps.channels, transition, kernel_size=1)
            self.classifier = nn.Linear(transition, n_labels)
        pool(torch.zeros(1, 1, 2, 2), pooling)  # refuse a bad name now
        self.pooling, self.lse_r, self.feature_dim = pooling, lse_r, transition
        self.backbone_parts = [self.maps]

    def _transition(self, x):
        return self.transition(self.maps(x))

    def pooled(self, x):
        return pool(self._transition(x), self.pooling, self.lse_r)

    def forward(self, x):
        return self.classifier(self.pooled(x))

    def heatmaps(self, x):
        t = self._transition(x)
        logits = self.classifier(pool(t, self.pooling, self.lse_r))
        return torch.einsum("kc,nchw->nkhw", self.classifier.weight.to(t.dtype), t), logits

    def training_loss(self, outputs, y, mask, loss_fn):
        return loss_fn(outputs.float(), y, mask)


class SpaceAttention(nn.Module):
    """Global context added to local features: the pooled last map tiled at every position and
    concatenated to it, one convolution to an S x S x K map; class scores are its average."""

    def __init__(self, backbone: str, state_file, seed: int, n_labels: int, kernel: int = 3):
        super().__init__()
        self.maps = FeatureMaps(backbone, state_file, seed)
        c = self.maps.channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(2 * c, n_labels, kernel_size=kernel, padding=kernel // 2)
        self.feature_dim = c
        self.backbone_parts = [self.maps]

    def _class_maps(self, x):
        f = self.maps(x)
        context = f.mean(dim=(2, 3), keepdim=True)
        return self.conv(torch.cat([f, context.expand_as(f)], dim=1))

    def pooled(self, x):
        return self.maps(x).mean(dim=(2, 3))  # the context vector

    def forward(self, x):
        return self._class_maps(x).mean(dim=(2, 3))

    def heatmaps(self, x):
        maps = self._class_maps(x)
        return maps, maps.mean(dim=(2, 3))

    def training_loss(self, outputs, y, mask, loss_fn):
        return loss_fn(outputs.float(), y, mask)


class AttentionGate(nn.Module):
    """Schlemper et al.'s additive attention: c = psi(relu(W_f f + W_g g + b_g)) (+ b_psi) per position,
    a softmax over positions, and the attention-weighted sum of f."""

    def __init__(self, f_channels: int, g_channels: int, inner: int):
        super().__init__()
        self.w_f = nn.Conv2d(f_channels, inner, kernel_size=1, bias=False)
        self.w_g = nn.Linear(g_channels, inner)  # b_g is its bias
        # b_psi is left out: a constant added to every position drops out of the softmax over positions
        # (its gradient is exactly zero), so it would be a parameter that never trains.
        self.psi = nn.Conv2d(inner, 1, kernel_size=1, bias=False)

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.psi(F.relu(self.w_f(f) + self.w_g(g)[:, :, None, None]))  # (N, 1, h, w)
        a = torch.softmax(c.flatten(1), dim=1).view_as(c)
        return (a * f).sum(dim=(2, 3)), a


class AttentionGated(nn.Module):
    """A ResNet-50 with attention gates after its second and third stages; per-scale scores
    (stage 2, stage 3, global) concatenated into a linear classifier."""

    def __init__(self, backbone: str, state_file, seed: int, n_labels: int, inner: int = 256):
        super().__init__()
        if LAYOUTS.get(backbone) != "resnet50":
            raise ValueError(f"--model attention-gated: gates a ResNet's stages; --backbone resnet50, not {backbone}")
        self.maps = FeatureMaps(backbone, state_file, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gate2 = AttentionGate(512, 2048, inner)
            self.gate3 = AttentionGate(1024, 2048, inner)
            self.score2, self.score3, self.score_g = (nn.Linear(c, n_labels) for c in (512, 1024, 2048))
            self.classifier = nn.Linear(3 * n_labels, n_labels)
        self.feature_dim = 512 + 1024 + 2048
        self.backbone_parts = [self.maps]

    def _parts(self, x):
        s = self.maps.stages(x)
        g = s["layer4"].mean(dim=(2, 3))
        f2, a2 = self.gate2(s["layer2"], g)
        f3, a3 = self.gate3(s["layer3"], g)
        return f2, f3, g, a2, a3

    def pooled(self, x):
        f2, f3, g, _, _ = self._parts(x)
        return torch.cat([f2, f3, g], dim=1)

    def _logits(self, f2, f3, g):
        return self.classifier(torch.cat([self.score2(f2), self.score3(f3), self.score_g(g)], dim=1))

    def forward(self, x):
        return self._logits(*self._parts(x)[:3])

    def heatmaps(self, x):
        f2, f3, g, a2, _ = self._parts(x)
        logits = self._logits(f2, f3, g)
        return a2.expand(-1, logits.shape[1], -1, -1), logits

    def training_loss(self, outputs, y, mask, loss_fn):
        return loss_fn(outputs.float(), y, mask)


class Bilinear(nn.Module):
    """Ge et al. 2018: two streams from the same pretrained backbone, stream 1 trained with sigmoid
    cross-entropy and stream 2 with MSML; bilinear pooling of their last maps (outer product at each
    position, averaged, signed square root, L2 normalization) and a 1x1 conv (a Linear on the pooled
    vector) with a fine-grained cross-entropy. Total loss alpha (MSML + CE) + beta FCE.

    Each stream's maps are first reduced by a 1x1 conv to `dim` channels: the full outer product of
    two 1024-channel (2048 for ResNet-50) maps would be a 1-4 M-wide vector and a 14-59 M-weight
    classifier. Predictions are the fine-grained classifier's."""

    def __init__(self, backbone: str, state_file, seed: int, n_labels: int, dim: int = 256, alpha: float = 0.2,
                 beta: float = 0.6):
        super().__init__()
        self.stream1 = FeatureMaps(backbone, state_file, seed)
        self.stream2 = FeatureMaps(backbone, state_file, seed)  # same start, trained apart
        c = self.stream1.channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head1, self.head2 = nn.Linear(c, n_labels), nn.Linear(c, n_labels)
            self.reduce1, self.reduce2 = nn.Conv2d(c, dim, 1), nn.Conv2d(c, dim, 1)
            self.fine = nn.Linear(dim * dim, n_labels)
        self.alpha, self.beta = alpha, beta
        self.feature_dim = 2 * c
        self.backbone_parts = [self.stream1, self.stream2]

    @staticmethod
    def bilinear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) x (N, D, h, w) -> (N, C*D): outer products averaged over positions, signed
        square root, L2-normalized."""
        n, _, h, w = a.shape
        z = torch.einsum("nchw,ndhw->ncd", a, b).flatten(1) / (h * w)
        z = torch.sign(z) * torch.sqrt(z.abs() + 1e-10)
        return F.normalize(z, dim=1)

    def _outputs(self, x):
        m1, m2 = self.stream1(x), self.stream2(x)
        p1, p2 = m1.mean(dim=(2, 3)), m2.mean(dim=(2, 3))
        fine = self.fine(self.bilinear(F.relu(self.reduce1(m1)), F.relu(self.reduce2(m2))))
        return fine, self.head1(p1), self.head2(p2), m1

    def pooled(self, x):
        return torch.cat([self.stream1(x).mean(dim=(2, 3)), self.stream2(x).mean(dim=(2, 3))], dim=1)

    def forward(self, x):
        fine, s1, s2, _ = self._outputs(x)
        return (fine, s1, s2) if self.training else fine

    def heatmaps(self, x):
        fine, _, _, m1 = self._outputs(x)
        return torch.einsum("kc,nchw->nkhw", self.head1.weight.to(m1.dtype), m1), fine

    def training_loss(self, outputs, y, mask, loss_fn):
        fine, s1, s2 = (o.float() for o in outputs)
        return self.alpha * (msml(s2, y, mask) + loss_fn(s1, y, mask)) + self.beta * loss_fn(fine, y, mask)


def plain_backbone_parts(model: nn.Module, backbone: str) -> list[nn.Module]:
    """The plain classifier's pretrained modules: every child but its head."""
    head = model.get_submodule(get_spec(backbone).classifier)
    return [m for m in model.children() if m is not head and head not in list(m.modules())]


class ThreeWay(nn.Module):
    """U-MultiClass on images (Irvin et al. 2019): a model with 3 outputs per label (negative, uncertain,
    positive) trained with a 3-way cross-entropy. In training mode it returns those (N, K, 3) logits;
    in eval mode one logit per label, z+ - z-, whose sigmoid is the positive probability renormalized
    over {negative, positive}, so evaluation, extraction, CAM and the service read it as any model."""

    def __init__(self, inner: nn.Module, backbone: str, n_labels: int):
        super().__init__()
        self.inner, self.backbone = inner, backbone
        self.n_labels = n_labels
        self.feature_dim = getattr(inner, "feature_dim", get_spec(backbone).feature_dim)

    @property
    def backbone_parts(self) -> list[nn.Module]:
        return list(self.inner.backbone_parts) if is_architecture(self.inner) else \
            plain_backbone_parts(self.inner, self.backbone)

    def three_way(self, x):
        out = self.inner(x)
        return out.view(out.shape[0], -1, 3)

    def forward(self, x):
        z = self.three_way(x)
        return z if self.training else z[..., 2] - z[..., 0]

    def pooled(self, x):
        if is_architecture(self.inner):
            return self.inner.pooled(x)
        head = self.inner.get_submodule(get_spec(self.backbone).classifier)
        captured = []
        handle = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            self.inner(x)
        finally:
            handle.remove()
        return captured[-1]

    def training_loss(self, outputs, y, mask, loss_fn):
        return multiclass_ce(outputs.float(), y, mask)


ARCHITECTURES = {
    "classifier": None,  # common.models.backbones.build_classifier
    "wang2017": Wang2017,
    "space-attention": SpaceAttention,
    "attention-gated": AttentionGated,
    "bilinear": Bilinear,
}


def build_model(name: str, backbone: str, state_file: str | None, seed: int, n_labels: int,
                options: dict | None = None, outputs_per_label: int = 1) -> nn.Module:
    """The architecture `name` on `backbone` (weights from `state_file`, else random from `seed`);
    with outputs_per_label 3, inside ThreeWay (U-MultiClass)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"--model {name!r}: choose from {', '.join(ARCHITECTURES)}")
    if outputs_per_label == 3:
        if name == "bilinear":
            raise ValueError("--policy multiclass: not with --model bilinear, whose MSML and CE terms are per label")
        return ThreeWay(build_model(name, backbone, state_file, seed, 3 * n_labels, options), backbone, n_labels)
    if name == "classifier":
        return build_classifier(backbone, state_file, seed, n_labels)
    if n_labels < 1:
        raise ValueError(f"a classifier needs at least one label, got {n_labels}")
    model = ARCHITECTURES[name](backbone, state_file, seed, n_labels, **(options or {}))
    model.n_labels = n_labels
    return model


def is_architecture(model: nn.Module) -> bool:
    """True for the models above, False for the plain classifier."""
    return hasattr(model, "training_loss")


def training_loss(model: nn.Module, outputs, y, mask, loss_fn) -> torch.Tensor:
    """The loss of `model(x)`'s training outputs: the architecture's own, else `loss_fn` on the logits."""
    if is_architecture(model):
        return model.training_loss(outputs, y, mask, loss_fn)
    return loss_fn(outputs.float(), y, mask)


class PooledFeatures(nn.Module):
    """A fine-tuned architecture as a frozen feature extractor: its pooled pre-classifier features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_dim = model.feature_dim

    def forward(self, x):
        return self.model.pooled(x)


def load_finetuned(weights: Checkpoint) -> nn.Module:
    """The fine-tuned model of a fine-tune checkpoint (common.models.checkpoint.read_checkpoint's record),
    with its head, weights loaded, in training mode as built."""
    model = build_model(weights.architecture, weights.backbone, None, 0, len(weights.label_names),
                        weights.model_options, weights.outputs_per_label)
    check_fits(model, weights.model_state, weights.path)
    try:
        model.load_state_dict(weights.model_state)
    except RuntimeError as exc:
        raise WeightsError(f"{weights.path}: {first_line(exc)}") from None
    return model
