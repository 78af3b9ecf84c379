"""The names the head CLIs' flags choose from, importable without torch or pyarrow (see
common/choices.py); heads.fit, heads.models and heads.data take them from here."""

PRECISIONS = ("auto", "fp32", "bf16")  # heads train on the CPU: no fp16
KINDS = ("linear", "mlp3", "mlp3-dropout")
SEX_ENCODINGS = ("indicator", "onehot")
