"""A fine-tuning run's settings and its split images: what the training function receives."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field

import numpy as np

from common.images.data_config import DataConfig
from common.runs.rundir import BEST, LAST  # noqa: F401 (a run directory's names live in common/runs/rundir.py)
from finetune.choices import SCHEDULES  # noqa: F401 (finetune.loop takes it from here)
from finetune.dataset import ImageDataset


def log(message: str) -> None:
    print(f"[finetune] {message}", file=sys.stderr, flush=True)


@dataclass
class SplitImages:
    """One split's images and their targets, rows aligned."""

    ids: list[str]
    paths: list[str]
    targets: np.ndarray  # (n, K) float32 0/1
    mask: np.ndarray  # (n, K) bool: False where a label is uncertain under U-Ignore
    # The raw labels' (y, mask) (common.data.targets.eval_targets): what the val AUROC scores, whatever
    # the policy; None: the targets themselves.
    truth: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, data_config: DataConfig, train: bool, seed: int = 0, cache=None) -> ImageDataset:
        return ImageDataset(self.paths, self.targets, self.mask, data_config, train, seed, cache)


@dataclass
class FinetuneConfig:
    out: str
    backbone: str
    label_names: list[str]
    train: SplitImages
    val: SplitImages
    state_file: str | None = None  # starting weights (ImageNet file or checkpoint); None: random
    init_seed: int = 0  # the new classifier, and the whole model without state_file
    data_config: DataConfig = field(default_factory=lambda: DataConfig(224))  # the model's one input
    model: str = "classifier"  # common/models/architectures.py: classifier, wang2017, space-attention, ...
    model_options: dict = field(default_factory=dict)  # the architecture's constructor options
    outputs_per_label: int = 1  # 3: U-MultiClass (common.models.architectures.ThreeWay)
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
    # Folder of the train and val images' decode cache (finetune/decode_cache.py); None: decode every epoch.
    decode_cache: str | None = None
    threads: int | None = None  # torch threads per process; default cores / processes on the node
    checkpoint_every: int = 500  # steps; last.pt is also written at every epoch end
    keep_epoch_checkpoints: bool = False  # also checkpoints/epoch-NNN.pt at every epoch end (checkpoint ensembles)
    log_every: int = 50  # steps between progress lines within an epoch; 0: none
    log_seconds: float = 30.0  # also a progress line when this long has passed since the last; 0: none
    stop_after_steps: int | None = None  # stop (after writing last.pt) once this call has run this many
    identity: dict = field(default_factory=dict)  # what a resumed run must match: identity_of(...)
    record: dict = field(default_factory=dict)  # the job's settings, stored in the checkpoints


# The FinetuneConfig fields a resumed run may change: a new field shapes training (and so joins
# the identity) unless it is listed here. `epochs` lets a run be continued for more epochs.
NOT_IDENTITY = frozenset({
    "out", "epochs", "device", "num_workers", "threads", "checkpoint_every", "keep_epoch_checkpoints", "log_every",
    "log_seconds",
    "decode_cache",  # where the decoded inputs are kept: the same values, bit for bit, as decoding them
    "stop_after_steps",
    "identity", "record",
    "state_file",  # a path; the caller gives the weights' label and sha256 instead
})


def _identity_value(value):
    """`value` as plain data that survives torch.save / weights_only load and compares by content."""
    if isinstance(value, SplitImages):
        digest = hashlib.sha256("\n".join(value.ids).encode())
        digest.update(np.ascontiguousarray(value.targets, np.float32).tobytes())
        digest.update(np.ascontiguousarray(value.mask, bool).tobytes())
        return f"{len(value)} images, sha256 {digest.hexdigest()[:16]}"
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _identity_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_identity_value(v) for v in value]
    return value


def identity_of(cfg: FinetuneConfig, **context) -> dict:
    """What a run resuming `cfg.out` must match: every field that shapes training (not NOT_IDENTITY),
    plus `context`, what shapes it from outside the config (weights digest, policy, process count)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_IDENTITY}
    return _identity_value({**fields, **context})


class FinetuneError(ValueError):
    """A run that cannot start or resume; the message is one line."""
