"""A torch Dataset of image files with multi-label targets, for fine-tuning and its evaluation.

Eval items are the model's input as its DataConfig builds it; train items are that input
through `DataConfig.train_view` (random shift and flip). The augmentation of image i in epoch e
depends only on (seed, e, i), so an epoch gives the same views whichever worker process decodes
which image, and a resumed epoch gives the same views as the run it continues.

An unreadable file does not stop training: its item is a zero image with ok=False, which the
training loop masks out of loss and metrics and records.

With a `cache` (finetune/decode_cache.py) the deterministic part, `DataConfig.load`, is read from it
(the same float32 values, bit for bit) and only the training view and the normalization run per item.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from common.images.data_config import DataConfig


class ImageDataset(Dataset):
    """Items (image (in_channels, S, S) float32 normalized, targets (K,) float32, mask (K,) float32, ok bool, index).

    `targets` and `mask` are (n, K) arrays aligned with `paths` (common.data.targets.apply_policy gives
    them). Set `epoch` before an epoch's DataLoader is iterated; with worker processes it must
    not be persistent, so every epoch's workers see the new value.
    """

    def __init__(self, paths, targets: np.ndarray, mask: np.ndarray, data_config: DataConfig, train: bool,
                 seed: int = 0, cache=None):
        if not (len(paths) == len(targets) == len(mask)):
            raise ValueError(f"{len(paths)} paths, {len(targets)} target rows and {len(mask)} mask rows differ")
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        self.data_config = data_config
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.cache = cache  # a finetune.decode_cache.DecodeCache of these paths in this order, or None

    def _input(self, i: int) -> np.ndarray | None:
        """`DataConfig.load` of image i, from the cache when there is one; None when unreadable."""
        if self.cache is not None:
            return self.cache.get(i)
        try:
            return self.data_config.load(self.paths[i])
        except Exception:  # any decoding failure: the loop counts it and names the file
            return None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        cfg = self.data_config
        image = self._input(i)
        if image is None:
            return torch.zeros(cfg.in_channels, cfg.input_size, cfg.input_size), self.targets[i], self.mask[i], False, i
        if self.train:
            image = cfg.train_view(image, np.random.default_rng([self.seed, self.epoch, i]))
        return cfg.to_tensor(image[None])[0], self.targets[i], self.mask[i], True, i
