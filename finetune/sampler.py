"""The order in which a rank visits the training images: seeded, sharded, resumable mid-epoch."""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """This rank's share of epoch `epoch`'s seeded permutation, from step `start_step` on.

    As DistributedSampler: the permutation depends on (seed, epoch) only and is padded, by
    repeating its start, to a multiple of the world size, so that every rank runs the same number
    of steps (DDP needs that); rank r takes positions r, r + W, r + 2W, ...
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        if n < 1:
            raise ValueError("no images to sample from")
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.epoch, self.start_step = 1, 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        order = np.resize(order, self.per_rank * self.world)  # wraps round: the padding
        return order[self.rank::self.world][self.start_step * self.batch_size:]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start_step * self.batch_size)
