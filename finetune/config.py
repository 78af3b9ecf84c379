"""A fine-tuning run's settings and its split images: what the training function receives."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from finetune.dataset import ImageDataset

LAST = "last.pt"
BEST = "best.pt"
SCHEDULES = ("plateau", "step")
BEST_METRICS = ("val_loss", "val_auc")


def log(message: str) -> None:
    print(f"[finetune] {message}", file=sys.stderr, flush=True)


@dataclass
class SplitImages:
    """One split's images and their targets, rows aligned."""

    ids: list[str]
    paths: list[str]
    targets: np.ndarray  # (n, K) float32 0/1
    mask: np.ndarray  # (n, K) bool: False where a label is uncertain under U-Ignore

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, input_size: int, train: bool, seed: int = 0) -> ImageDataset:
        return ImageDataset(self.paths, self.targets, self.mask, input_size, train, seed)


@dataclass
class FinetuneConfig:
    out: str
    backbone: str
    label_names: list[str]
    train: SplitImages
    val: SplitImages
    state_file: str | None = None  # starting weights (ImageNet file or checkpoint); None: random
    init_seed: int = 0  # the new classifier, and the whole model without state_file
    input_size: int = 224
    freeze_backbone: bool = False
    loss: str = "weighted_bce"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 16  # per process
    epochs: int = 20
    schedule: str = "plateau"  # 'plateau': ReduceLROnPlateau on val loss; 'step': x lr_factor every step_epochs
    step_epochs: int = 10
    lr_factor: float = 0.1
    plateau_patience: int = 1
    early_stop_patience: int = 3  # epochs without a better best_metric; <= 0 never stops early
    best_metric: str = "val_loss"
    seed: int = 0  # batch order and augmentation
    precision: str = "auto"
    device: str = "cpu"  # 'cpu' | 'cuda'
    num_workers: int = 2  # DataLoader worker processes per training process
    threads: int | None = None  # torch threads per process; default cores / processes on the node
    checkpoint_every: int = 500  # steps; last.pt is also written at every epoch end
    log_every: int = 50  # steps between progress lines within an epoch; 0: none
    stop_after_steps: int | None = None  # stop (after writing last.pt) once this call has run this many
    identity: dict = field(default_factory=dict)  # what a resumed run must match (see resume_point)
    record: dict = field(default_factory=dict)  # the job's settings, stored in the checkpoints


class FinetuneError(ValueError):
    """A run that cannot start or resume; the message is one line."""
