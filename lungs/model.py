"""A compact U-Net for lung masks on frontal chest radiographs, its checkpoint, and the inference API.

The API the Spark job calls:

    model, config = load_lung_model("default", device)    # or a checkpoint path; eval mode, fp32
    masks = predict_masks(model, images)                  # images (N, S, S) float in [0, 1] -> (N, S, S) bool

`S` is config["size"] (256 for the shipped model); resize images to it first. The model
standardizes each image itself (zero mean, unit std), so callers pass plain [0, 1] gray and no
hospital's brightness or window setting is baked into a mean/std. `predict_masks` returns the raw
thresholded masks; lungs.postprocess cleans them.

Checkpoint: a dict saved with common.models.torch_files.save_atomic, format "cxr-features/lungs" version 1:
{"format", "format_version", "config": {"size", "base", "depth"}, "state_dict" (fp16 tensors, to keep
the file small; fp32 again on load), "data": the data source and split, "metrics"}.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common import atomic
from common.models.torch_files import load_versioned, save_atomic

FORMAT = "cxr-features/lungs"
FORMAT_VERSION = 1
DEFAULT = Path(__file__).resolve().parent / "models" / "default.pt"
DEFAULT_CONFIG = {"size": 256, "base": 16, "depth": 4}


class LungModelError(ValueError):
    """A lung model file that cannot be used; the message is one line naming it."""


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """`depth` 2x downsamplings, channels base*2^level, bilinear upsampling, one logit per pixel."""

    def __init__(self, base: int = 16, depth: int = 4):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(1, widths[0])] + [_block(widths[i], widths[i + 1]) for i in range(depth)])
        # Decoder: upsample, concatenate the skip, convolve down to the skip's width.
        self.up = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-image standardization: robust to another hospital's exposure and windowing.
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        x = (x - mean) / std
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def build_model(config: dict) -> UNet:
    return UNet(base=int(config["base"]), depth=int(config["depth"]))


def save_lung_model(model: UNet, config: dict, path: Path, data: dict, metrics: dict) -> None:
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    save_atomic({"format": FORMAT, "format_version": FORMAT_VERSION, "config": dict(config), "state_dict": state,
                 "data": data, "metrics": metrics}, Path(path))


def lung_model_file(name: str | Path) -> Path:
    """A --lung-model / --model value as a file; "default" is the shipped model. Imported from the zip that
    spark-submit.sh ships the packages in, the shipped model is copied out of it once (torch.load, hashing and
    SparkContext.addFile need a real file)."""
    if str(name) != "default":
        return Path(name)
    if DEFAULT.is_file():
        return DEFAULT
    packed = importlib.resources.files(__package__) / "models" / DEFAULT.name
    if not packed.is_file():
        return DEFAULT  # missing: read_lung_checkpoint says so
    data = packed.read_bytes()
    copy = Path(tempfile.gettempdir()) / "cxr-features-shipped" / f"{hashlib.sha256(data).hexdigest()[:16]}-{DEFAULT.name}"
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(copy, data)  # whole or absent, for a concurrent reader
    return copy


def read_lung_checkpoint(path: str | Path) -> dict:
    path = lung_model_file(path)
    if not path.is_file():
        raise LungModelError(f"--model {path}: not found" + (" (the shipped default model is missing; train one "
                                                             "with `python jobs/lung_model.py train`)" if path == DEFAULT else ""))
    return load_versioned(path, FORMAT, FORMAT_VERSION, LungModelError, "lung model")


def load_lung_model(path: str | Path = "default", device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """The model of checkpoint `path` ("default": lungs/models/default.pt) in eval mode on `device`, and its config."""
    obj = read_lung_checkpoint(path)
    model = build_model(obj["config"])
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in obj["state_dict"].items()})
    except RuntimeError:
        raise LungModelError(f"{path}: weights do not fit a U-Net of config {obj['config']}") from None
    return model.to(device).eval(), dict(obj["config"])


@torch.no_grad()
def predict_logits(model: UNet, images, batch_size: int = 16) -> np.ndarray:
    """(N, S, S) float [0, 1] -> (N, S, S) float32 logits."""
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    out = [model(x[i:i + batch_size, None].to(device)).float()[:, 0].cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(x.shape, np.float32)


def predict_masks(model: UNet, images, batch_size: int = 16) -> np.ndarray:
    """(N, S, S) float [0, 1] -> (N, S, S) bool lung masks (logit > 0), before post-processing."""
    return predict_logits(model, images, batch_size) > 0


# Test-time views: (scale, shift x, shift y, gamma). No flip: the heart sits left and the model learned it.
TTA_VIEWS = ((1.0, 0.0, 0.0, 1.0), (1.1, 0.0, 0.0, 1.0), (0.9, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0, 0.6),
             (1.0, 0.0, 0.0, 1.6))


def _affine(scale: float, dx: float, dy: float, n: int) -> torch.Tensor:
    return torch.tensor([[scale, 0.0, dx], [0.0, scale, dy]], dtype=torch.float32).expand(n, 2, 3)


@torch.no_grad()
def predict_logits_tta(model: UNet, images, views=TTA_VIEWS, batch_size: int = 16) -> np.ndarray:
    """predict_logits averaged over small zooms, shifts and gammas of each image, each view's logits mapped
    back to the image's own pixels (pixels a view did not see do not count for it)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    total, weight = torch.zeros_like(x), torch.zeros_like(x)
    for scale, dx, dy, gamma in views:
        grid = F.affine_grid(_affine(scale, dx, dy, len(x)), list(x.shape), align_corners=False)
        view = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1) ** gamma
        logits = torch.from_numpy(predict_logits(model, view[:, 0].numpy(), batch_size))[:, None]
        back = F.affine_grid(_affine(1 / scale, -dx / scale, -dy / scale, len(x)), list(x.shape), align_corners=False)
        total += F.grid_sample(logits, back, mode="bilinear", padding_mode="zeros", align_corners=False)
        weight += F.grid_sample(torch.ones_like(logits), back, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (total / weight.clamp_min(1e-3))[:, 0].numpy()
