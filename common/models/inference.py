"""The frozen feature extractor (`build_extractor`), run on batches of decoded images as fast as the
device allows.

One `FeatureExtractor` per worker process: building it loads the weights, calling it turns an
(N, S, S) gray batch from its `DataConfig.load` into (N, feature_dim) float32 features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.models.architectures import PooledFeatures, load_finetuned
from common.models.backbones import backbone_model
from common.choices import PRECISIONS
from common.images.data_config import DataConfig
from common.models.model_registry import get_spec
from common.models.weights import load_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ImagePredictions:
    """What a run answers for a batch of images, whichever kind of run it is (heads.predictions.HeadOnImages,
    finetune.predictor.FinetuneOnImages): the service and heads.predict --images read these fields."""
    probs: np.ndarray  # (n, labels), NaN rows where `errors` has a reason
    errors: list  # None or a one-line reason per image
    columns: dict  # extra per-image columns (lung_fraction, lung_qa of a masked store)
    masked: np.ndarray | None = None  # the lung-masked inputs (n, S, S) of a masked store, as the backbone saw them
    cams: np.ndarray | None = None  # class activation maps (n, labels, h, w), for models that have them


def build_extractor(backbone: str, state_file: str | None, seed: int = 0) -> nn.Module:
    """The frozen feature extractor, in eval mode without gradients: the backbone without its head
    (`common.models.backbones.build_backbone`), or for a fine-tune checkpoint of a literature architecture
    (common/models/architectures.py) its pooled features. The weights file is read once."""
    weights = load_weights(state_file, backbone) if state_file else None
    if weights is not None and weights.is_architecture:
        model = PooledFeatures(load_finetuned(weights))
    else:
        model = backbone_model(backbone, weights, seed)
    model.eval()
    model.requires_grad_(False)
    return model


def cpu_has_fast_bf16() -> bool:
    # oneDNN's own check for native bf16 (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device_type: str = "cpu") -> str:
    """'auto' -> fp16 on CUDA, bf16 on a CPU with native bf16, else fp32; fp16 only on CUDA."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: choose from {', '.join(PRECISIONS)}")
    if name == "fp16" and device_type != "cuda":
        raise ValueError("--precision 'fp16' needs a CUDA device; on CPU use bf16 or fp32")
    if name == "auto":
        return "fp16" if device_type == "cuda" else ("bf16" if cpu_has_fast_bf16() else "fp32")
    return name


def autocast(device_type: str, precision: str):
    """Mixed precision: weights stay fp32, the ops autocast lists run in the resolved dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


class FeatureExtractor:
    """A frozen backbone on one device, with the precision and memory layout chosen for speed.

    precision 'auto' is bf16 autocast on a CPU with native bf16 (fp32 on other CPUs) and fp16
    autocast on CUDA. `threads` sets torch's intra-op threads for the whole process.
    """

    def __init__(
        self,
        backbone: str,
        state_file: str | None,
        seed: int,
        device: str = "cpu",
        precision: str = "auto",
        threads: int | None = None,
        data_config: DataConfig | None = None,
    ) -> None:
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device {device!r}: only cpu and cuda[:N] are supported") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"device {device!r}: torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
                )
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise ValueError(f"precision 'bf16': device {device!r} does not support bf16; use fp16 or fp32")
        elif self.device.type != "cpu":
            raise ValueError(f"device {device!r}: only cpu and cuda[:N] are supported")
        self.precision = resolve_precision(precision, self.device.type)
        if threads is not None:
            torch.set_num_threads(threads)

        self.dtype = DTYPES[self.precision]
        self._spec = get_spec(backbone)
        # A checkpoint's own config (size, geometry) where it has one; else the registry's default.
        self.data_config = data_config or self._spec.data_config
        # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
        model = build_extractor(backbone, state_file, seed)
        self.model = model.to(self.device, memory_format=torch.channels_last)

    @property
    def feature_dim(self) -> int:
        # An architecture checkpoint's pooled features have their own width.
        return getattr(self.model, "feature_dim", self._spec.feature_dim)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) float32 in [0, 1] -> (N, feature_dim) float32."""
        with torch.inference_mode():
            gray = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            if self.device.type == "cuda":
                # Copy the one-channel batch (a third of the bytes) and normalize on the GPU.
                gray = gray.pin_memory().to(self.device, non_blocking=True)
            x = self.data_config.to_tensor(gray).contiguous(memory_format=torch.channels_last)
            with autocast(self.device.type, self.precision):
                features = self.model(x)
            return features.float().cpu().numpy()
