"""A fine-tune run's settings: one frozen record, made from the checked flags by
jobs/fine_tune.settings_from and taken by finetune.run, which never sees a parser. Picklable and
light (no torch), so the command line builds it before the heavy imports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# The flags left unset (None) that the starting weights decide. From random weights: a 10x larger step (1e-4 is
# a fine-tuning rate: a from-scratch MobileNetV3 on Shenzhen barely moved in 6 epochs), the epoch chosen by
# val AUROC (val loss stays near ln 2 for epochs while the ranking already improves), and more patience for
# the noisier AUROC of a small val split. From pretrained weights: CheXNet's choices, as before.
FROM_SCRATCH = {"lr": 1e-3, "best_metric": "val_auc", "early_stop_patience": 5}
FINE_TUNING = {"lr": 1e-4, "best_metric": "val_loss", "early_stop_patience": 3}


def scratch_defaults(from_scratch: bool) -> dict:
    return dict(FROM_SCRATCH if from_scratch else FINE_TUNING)


@dataclass(frozen=True)
class FinetuneSettings:
    """One field per flag of jobs/fine_tune.py (--config aside), in the parser's order, then what
    the flags imply (model_options). The defaults live in the parser alone. Table flags keep the
    names common.data.image_table.table_from_flags reads."""

    out: str
    overwrite: bool
    # images and their split (common.data.table_flags)
    dataset: str
    metadata: str | None
    images: str | None
    split: str
    train_val_list: str | None
    test_list: str | None
    val_fraction: float
    split_ratios: str  # "train,val,test", parsed by table_from_flags
    seed: int
    test_metadata: str | None
    test_images: str | None
    keep_laterals: bool
    limit: int | None
    table_mapping: str | None
    path_column: str | None
    patient_column: str | None
    image_id_column: str | None
    view_column: str | None
    age_column: str | None
    sex_column: str | None
    label_columns: str | None
    findings_column: str | None
    findings_separator: str | None
    label_names: str | None
    no_finding: str | None
    blank_label: int | None
    label_key: str | None
    label_table: str | None
    header_workers: int | None
    # model
    backbone: str
    weights: str
    download_weights: bool
    input_size: int | None
    resize: str | None
    freeze_backbone: bool
    model: str
    pooling: str | None
    lse_r: float | None
    transition_channels: int | None
    space_kernel: int | None
    gate_channels: int | None
    bilinear_dim: int | None
    bilinear_alpha: float | None
    bilinear_beta: float | None
    # labels and loss
    labels: str
    keep_no_finding: bool
    policy: str
    loss: str
    focal_gamma: float
    focal_alpha: float | None
    # optimization
    lr: float | None  # None until resolve_defaults
    weight_decay: float
    betas: tuple[float, float]
    batch_size: int
    epochs: int
    schedule: str
    lr_factor: float
    step_epochs: int
    plateau_patience: int
    early_stop_patience: int | None  # None until resolve_defaults
    best_metric: str | None  # None until resolve_defaults
    train_seed: int
    # machine
    num_processes: int
    local_mode: bool
    device: str  # as asked: 'auto' is resolved once the run directory is ready
    precision: str  # as asked: 'auto' is resolved by the training processes
    num_workers: int
    threads: int | None
    decode_cache: str | None
    no_decode_cache: bool
    checkpoint_every: int
    checkpoint_ensemble: int
    log_every: int
    log_seconds: float
    stop_after_steps: int | None
    # localization
    bbox_list: str | None
    localize_split: str
    overlays: int
    # evaluation
    age_bands: tuple[float, ...]  # edges in years of the subgroups' age bands (common/evaluation/age_bands.py)
    calibrate: str  # none | temperature (fitted on val with best.pt, common/evaluation/calibration.py)
    operating_point: tuple[str, ...]  # targets as "metric=value", chosen on val (common/evaluation/operating_points.py)
    # implied: the chosen --model's options (finetune.choices.model_options), as (key, value) pairs
    # so that the record stays immutable
    model_options: tuple[tuple[str, int | float | str], ...]

    def to_dict(self) -> dict:
        """What the run records (config.json's "settings", the checkpoints' "record"), in JSON's own
        types and sorted by key, as runs recorded their parsed flags before this record existed."""
        values = asdict(self)
        values["model_options"] = dict(self.model_options)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(values.items())}


def resolve_defaults(settings: FinetuneSettings, from_scratch: bool, saved: dict | None = None) -> FinetuneSettings:
    """`settings` with the unset flags of scratch_defaults filled: from `saved` (the identity of the
    interrupted run being resumed, so that a run started under older defaults resumes with its own), else
    from the weights' route. The run records the resolved values."""
    defaults = scratch_defaults(from_scratch)
    saved = saved or {}
    return replace(settings, **{key: saved.get(key, value) for key, value in defaults.items()
                                if getattr(settings, key) is None})
