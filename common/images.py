"""Image decoding and preprocessing: file -> float32 gray array -> normalized network input.

Pure functions (no Spark). torch is imported only by `Preprocessing.to_tensor`, so decoding
can run, and be tested, without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Integer modes Pillow gives 16-bit grayscale files (PNG opens as 'I;16' in recent Pillow,
# as 'I' in older ones; big-endian TIFF as 'I;16B').
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str, size: int) -> np.ndarray:
    """Decode `path` to one gray channel stretched to (size, size), float32 in [0, 1].

    8-bit images are scaled by 1/255 and 16-bit ones by 1/65535. The resize runs in Pillow's
    float mode 'F' for every input (as fast as in 'L' here) so that no 8-bit rounding happens
    after the resize, and a 16-bit copy x*257 of an 8-bit image gives the same array.
    A missing, truncated or non-image file raises; nothing is returned for it.
    """
    with Image.open(path) as img:
        # Lets the JPEG decoder produce gray at a DCT-reduced scale still >= size (no-op otherwise).
        img.draft("L", (size, size))
        # Decode now: a truncated file raises here instead of yielding a partly gray image.
        img.load()
        if img.mode in _SIXTEEN_BIT_MODES:
            if img.mode == "I":
                # 'I' is 32-bit signed: only 16-bit content has a known scale.
                low, high = img.getextrema()
                if low < 0 or high > 65535:
                    raise ValueError(f"{path}: 32-bit integer image with values {low}..{high}, outside 16-bit range")
            gray, scale = img.convert("F"), 1.0 / 65535.0
        elif img.mode == "F":
            raise ValueError(f"{path}: float image (mode F) has no known value range")
        else:
            # convert('L') first: for 'P' a direct convert('F') would give palette indices.
            gray = img if img.mode == "L" else img.convert("L")
            gray, scale = gray.convert("F"), 1.0 / 255.0
    resized = gray.resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(resized, dtype=np.float32) * np.float32(scale)
    # Bilinear weights are a convex combination, so only float error can step past the ends.
    return np.clip(out, 0.0, 1.0, out=out)


@dataclass(frozen=True)
class Preprocessing:
    """How a gray [0, 1] image becomes a network input; `describe()` goes into the store manifest."""

    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def describe(self) -> dict:
        return {
            "input_size": self.input_size,
            "resize": "stretch to input_size x input_size (no crop), bilinear, antialiased (Pillow, float mode)",
            "value_scaling": "8-bit /255, 16-bit /65535",
            "channels": "grayscale replicated to 3 channels",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def to_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, S, S) float32 in [0, 1] -> (N, 3, S, S) float32, normalized per channel.

        A torch tensor is accepted too and stays on its device, so a GPU caller can copy the
        one-channel batch and normalize there.
        """
        import torch

        x = torch.as_tensor(batch)
        if x.ndim != 3 or x.shape[1:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected a batch of shape (N, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        x = x.to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        # (N, 1, S, S) broadcast against (1, 3, 1, 1) replicates the gray channel in the same op.
        return (x.unsqueeze(1) - mean) / std
