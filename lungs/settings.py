"""The lung command's settings: one frozen record per subcommand, made from the checked flags by
jobs/lung_model.settings_from and taken by lungs.train, which never sees a parser. Light (no torch),
so the command line builds it before the heavy imports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar


def _recorded(settings) -> dict:
    """What a run records as its settings: the subcommand first, then the flags in the parser's
    order, in JSON's own types (lists, not tuples), as runs recorded their parsed flags before."""
    values = {"command": settings.COMMAND, **asdict(settings)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class LungTrainSettings:
    """One field per flag of `jobs/lung_model.py train`, in the parser's order; the defaults live
    in the parser alone."""

    COMMAND: ClassVar[str] = "train"

    images: str
    masks: str
    out: str
    overwrite: bool
    device: str  # as asked: 'auto' is resolved by the run
    threads: int | None
    size: int
    base: int
    depth: int
    split: tuple[float, float, float]  # train, val, test shares of the patients, checked
    split_seed: int
    seed: int
    epochs: int
    batch_size: int
    lr: float
    lr_patience: int
    patience: int
    max_minutes: float | None
    max_steps: int | None
    init: str | None  # a lung checkpoint (or "default") to start from; its recorded split is kept
    flip: bool
    films: float  # share of training images given a portable film's look (lungs.data.film_looks)
    precision: str  # as asked: 'auto' is resolved by the run

    def to_dict(self) -> dict:
        return _recorded(self)


@dataclass(frozen=True)
class LungEvaluateSettings:
    """One field per flag of `jobs/lung_model.py evaluate`, in the parser's order."""

    COMMAND: ClassVar[str] = "evaluate"

    model: str  # a checkpoint path, or "default": the shipped model
    images: str
    masks: str
    out: str
    overwrite: bool
    device: str
    threads: int | None
    worst: int
    split: str  # all, or one split of the model's own training run

    def to_dict(self) -> dict:
        return _recorded(self)
