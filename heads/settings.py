"""A head run's settings: one frozen record, made from the checked flags by heads.train.settings_from
and taken by the engine (heads.run, heads.grid, heads.selftrain), which never sees a parser.
Light (no torch), so the command line builds it before the heavy imports."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HeadSettings:
    """One field per flag of heads.train (--config aside), in the parser's order: config.json's
    "settings" and head.pt's "config" record them so. The defaults live in the parser alone."""

    store: tuple[str, ...]
    out: str
    overwrite: bool
    labels: str
    keep_no_finding: bool
    policy: str
    self_train_rounds: int
    self_train_tol: float
    age_sex: bool
    sex_encoding: str
    head: str
    hidden: tuple[int, ...]
    dropout: float | None
    loss: str
    focal_gamma: float
    focal_alpha: float | None
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    batch_size: int
    epochs: int
    plateau_patience: int
    plateau_factor: float
    early_stop_patience: int
    grid_lr: tuple[float, ...]  # empty: no grid over learning rates (--lr)
    grid_weight_decay: tuple[float, ...]  # empty: --weight-decay alone
    grid_metric: str
    grid_ensemble: int
    bootstrap_draws: int
    calibrate: str  # none | temperature (fitted on val, common/evaluation/calibration.py)
    operating_point: tuple[str, ...]  # targets as "metric=value", chosen on val (common/evaluation/operating_points.py)
    age_bands: tuple[float, ...]  # edges in years of the subgroups' age bands (common/evaluation/age_bands.py)
    init_seed: int
    threads: int | None
    precision: str  # as asked: 'auto' is resolved by the run
    quiet: bool

    def to_dict(self) -> dict:
        """What the run records, in JSON's own types (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
