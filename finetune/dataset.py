"""A torch Dataset of image files with multi-label targets, for fine-tuning and its evaluation.

Train items: the image resized to `resize_size(input_size)` (256 for 224, the ImageNet ratio),
a random input_size crop and a random horizontal flip; eval items: the center crop. The
augmentation of image i in epoch e depends only on (seed, e, i), so an epoch gives the same
crops whichever worker process decodes which image, and a resumed epoch gives the same crops
as the run it continues.

An unreadable file does not stop training: its item is a zero image with ok=False, which the
training loop masks out of loss and metrics and records.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from common.images import Preprocessing, load_image


def resize_size(input_size: int) -> int:
    """The side an image is resized to before cropping: 256 for 224 (ImageNet's 0.875 ratio)."""
    return round(input_size / 0.875)


def crop_offsets(resized: int, size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """Top and left of a size x size crop: uniform with `rng`, centered without."""
    room = resized - size
    if rng is None:
        return room // 2, room // 2
    return int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1))


class ImageDataset(Dataset):
    """Items (image (3, S, S) float32 normalized, targets (K,) float32, mask (K,) float32, ok bool, index).

    `targets` and `mask` are (n, K) arrays aligned with `paths` (heads.data.apply_policy gives
    them). Set `epoch` before an epoch's DataLoader is iterated; with worker processes it must
    not be persistent, so every epoch's workers see the new value.
    """

    def __init__(self, paths, targets: np.ndarray, mask: np.ndarray, input_size: int, train: bool,
                 seed: int = 0):
        if not (len(paths) == len(targets) == len(mask)):
            raise ValueError(f"{len(paths)} paths, {len(targets)} target rows and {len(mask)} mask rows differ")
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        self.input_size = input_size
        self.resized = resize_size(input_size)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.preprocessing = Preprocessing(input_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        size = self.input_size
        try:
            image = load_image(self.paths[i], self.resized)
        except Exception:  # any decoding failure: the loop counts it and names the file
            return torch.zeros(3, size, size), self.targets[i], self.mask[i], False, i
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        top, left = crop_offsets(self.resized, size, rng)
        crop = image[top:top + size, left:left + size]
        if rng is not None and rng.random() < 0.5:
            crop = crop[:, ::-1]
        x = self.preprocessing.to_tensor(np.ascontiguousarray(crop)[None])[0]
        return x, self.targets[i], self.mask[i], True, i
