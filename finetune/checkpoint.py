"""Fine-tune checkpoints: where a run is (TrainState), writing last.pt / best.pt, reading them back.

The run directory `cfg.out` receives, from rank 0 only, each written atomically:

    last.pt   every `checkpoint_every` steps and at each epoch end: weights, optimizer,
              scheduler, epoch and step, history, every rank's RNG state. `train` resumes from
              it when it is there: a killed run, started again, continues at the saved step.
    best.pt   the weights of the best epoch so far by `best_metric` (no optimizer state).

Both are fine-tune checkpoints (common/models/checkpoint.py documents the format, writes and reads it;
the extraction job takes either as --weights). Besides the format's keys they hold: epoch (last.pt:
the epoch in progress, 1-based; best.pt: the best epoch), step (steps done in that epoch),
global_step, history, identity (what a resumed run must match), config (the job's settings),
train_state, and in last.pt only optimizer, scheduler (type and state), scaler, rng and world_size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.models.architectures import load_finetuned
from common.models.checkpoint import Checkpoint, read_checkpoint
from finetune.config import LAST, FinetuneConfig, FinetuneError


@dataclass
class TrainState:
    """Where training is; saved in last.pt and restored on resume."""

    epoch: int = 1  # the epoch in progress, 1-based
    step: int = 0  # steps done in it
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch so far, summed over ranks at each checkpoint
    loss_count: float = 0.0
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_value: float = math.inf  # best_metric as a loss: val_loss, or -val_auc
    best_val_loss: float = math.nan
    best_val_auc: float = math.nan
    bad_epochs: int = 0
    stopped: str | None = None  # set once training is over: 'epochs' | 'early_stop' | 'diverged'
    seconds: float = 0.0  # training time over all runs
    unreadable: list = field(default_factory=list)  # paths that failed to decode


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def state_sha256(state: dict) -> str:
    """Digest of a state dict (every parameter and buffer), to check that data-parallel replicas agree."""
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint(model: torch.nn.Module, cfg: FinetuneConfig, state: TrainState, epoch: int, **extra) -> dict:
    """A fine-tune checkpoint of `model` (unwrapped: no 'module.' prefix), loadable with weights_only."""
    return Checkpoint(
        _cpu_state(model), backbone=cfg.backbone, architecture=cfg.model, model_options=dict(cfg.model_options),
        outputs_per_label=cfg.outputs_per_label, feature_dim=int(getattr(model, "feature_dim", 0)) or None,
        label_names=tuple(cfg.label_names), data_config=cfg.data_config,
        extra={"epoch": epoch, "step": state.step, "global_step": state.global_step, "history": list(state.history),
               "identity": dict(cfg.identity), "config": dict(cfg.record), "train_state": asdict(state), **extra},
    ).to_dict()


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The fine-tuned model of a checkpoint, with its head, in eval mode on `device`, and the checkpoint's dict."""
    weights = read_checkpoint(path, finetune=True)
    return load_finetuned(weights).to(device).eval(), weights.to_dict()


def saved_identity(out: str | Path) -> dict | None:
    """The identity recorded by the run in `out` that a new call would resume; None when there is none."""
    path = Path(out) / LAST
    return read_checkpoint(path, finetune=True).extra.get("identity") if path.is_file() else None


def resume_point(out: str | Path, identity: dict) -> dict | None:
    """The saved position of an interrupted run in `out`, after checking it is this run; None if none."""
    path = Path(out) / LAST
    if not path.is_file():
        return None
    obj = read_checkpoint(path, finetune=True).extra
    saved = obj.get("identity", {})
    missing = "(not recorded)"
    differ = [f"{k}: checkpoint={saved.get(k, missing)!r}, now={identity.get(k, missing)!r}"
              for k in sorted(set(saved) | set(identity)) if saved.get(k, missing) != identity.get(k, missing)]
    if differ:
        raise FinetuneError(f"--out {out} holds an interrupted run with other training settings ({'; '.join(differ)}); "
                            "resume with the checkpoint's settings (--epochs may differ), or pass --overwrite to start "
                            "over")
    return {"epoch": obj["epoch"], "step": obj["step"], "global_step": obj["global_step"],
            "stopped": obj.get("train_state", {}).get("stopped")}


def scheduler_state(scheduler) -> dict:
    """The LR scheduler's state with its type: the state dicts of StepLR and ReduceLROnPlateau load
    into each other without a complaint, so loading checks the type (load_scheduler)."""
    return {"type": type(scheduler).__name__, "state": scheduler.state_dict()}


def load_scheduler(scheduler, saved, path: str | Path) -> None:
    """Restore `scheduler` from scheduler_state's dict saved in `path`, refusing another scheduler type."""
    kind = saved.get("type") if isinstance(saved, dict) and "state" in saved else None
    want = type(scheduler).__name__
    if kind != want:
        raise FinetuneError(f"{path}: holds {kind or 'an untyped'} scheduler state, this run's scheduler is {want}; "
                            "resume with the checkpoint's --schedule, or pass --overwrite to start over")
    scheduler.load_state_dict(saved["state"])
