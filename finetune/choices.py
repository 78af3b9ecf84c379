"""The names jobs/fine_tune.py's flags choose from, importable without torch (see common/choices.py);
finetune.config takes them from here."""

SCHEDULES = ("plateau", "step")
BEST_METRICS = ("val_loss", "val_auc")

# common/models/architectures.py's registry (tests/test_architectures.py keeps the two equal).
MODELS = ("classifier", "wang2017", "space-attention", "attention-gated", "bilinear")
# Each model's own flags -> its constructor's keyword; a flag given for another model is refused.
MODEL_FLAGS = {
    "wang2017": {"transition_channels": "transition", "pooling": "pooling", "lse_r": "lse_r"},
    "space-attention": {"space_kernel": "kernel"},
    "attention-gated": {"gate_channels": "inner"},
    "bilinear": {"bilinear_dim": "dim", "bilinear_alpha": "alpha", "bilinear_beta": "beta"},
}
POOLINGS = ("avg", "max", "lse")


def model_options(args) -> dict:
    """The chosen --model's options from the flags given (the model's defaults for the rest); a
    one-line ValueError for a model flag of another model."""
    own = MODEL_FLAGS.get(args.model, {})
    for model, flags in MODEL_FLAGS.items():
        for flag in flags:
            if model != args.model and getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: an option of --model {model}, not {args.model}")
    return {key: getattr(args, flag) for flag, key in own.items() if getattr(args, flag, None) is not None}
