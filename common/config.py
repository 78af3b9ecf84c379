"""Job configuration: defaults < an optional TOML file in conf/ < command-line flags, and the flag
helpers every command line shares (help with defaults, list values, loss flags, progress lines)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from pathlib import Path


class ConfigError(ValueError):
    pass


def load_section(path: str | Path, section: str) -> dict:
    """The `[section]` table of a TOML file, or the whole file when it has no such table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return data.get(section, data)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None, section: str) -> argparse.Namespace:
    """Parse flags, letting a `--config FILE` supply defaults that explicit flags override.

    Config keys are flag names with dashes or underscores (`chunk-size` or `chunk_size`). Each
    value goes through the same parser as the flag (its type, choices and number of values), so a
    file is held to what the command line is; a bad value or an unknown key is a one-line
    ConfigError naming the file, the table and the key. On/off flags take true or false; a list
    for a one-value flag is its comma-separated form (`hidden = [128, 32]` is `--hidden 128,32`).
    Paths in the file are relative to the directory the job is started from.
    """
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        values = load_section(first.config, section)
        flags = {s: a for a in parser._actions for s in a.option_strings
                 if a.dest not in ("config", argparse.SUPPRESS)}
        settings = {}
        for key, value in values.items():
            where, flag = f"{first.config} [{section}] {key}", "--" + key.replace("_", "-")
            action = flags.get(flag)
            if action is None:
                raise ConfigError(f"{where}: unknown setting (not a flag of this job)")
            tokens = _flag_tokens(flag, action, value, where)
            if tokens:
                settings[action.dest] = _parse_tokens(parser, action, tokens, where)
        parser.set_defaults(**settings)
    return parser.parse_args(argv)


def _flag_tokens(flag: str, action: argparse.Action, value, where: str) -> list[str]:
    """The command-line words that give `flag` the config file's `value`."""
    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        if value:
            return [flag]
        if isinstance(action, argparse.BooleanOptionalAction):
            return ["--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]]
        return []  # off: the flag's default
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool):
            raise ConfigError(f"{where}: expected a value, got {str(item).lower()} (true/false is for on/off flags)")
        if isinstance(item, (dict, list)):
            raise ConfigError(f"{where}: expected a value or a list of values, got {item!r}")
    words = [str(v) for v in items]
    if action.nargs is None or action.nargs == "?":
        return [f"{flag}={','.join(words)}"]  # '=': a value starting with '-' is not read as a flag
    return [flag, *words]


def _parse_tokens(parser: argparse.ArgumentParser, action: argparse.Action, tokens: list[str], where: str):
    """`action`'s value parsed from `tokens` by `parser`, its errors raised rather than exiting."""
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        parsed, rest = parser.parse_known_args(tokens, argparse.Namespace())
    except argparse.ArgumentError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    finally:
        parser.exit_on_error = exit_on_error
    if rest:
        raise ConfigError(f"{where}: {' '.join(rest)!r} is not a value this flag takes")
    return getattr(parsed, action.dest)


def require(args: argparse.Namespace, *flags: str) -> None:
    """Refuse a run missing a flag that neither the command line nor the config file gave."""
    for flag in flags:
        if not getattr(args, flag.replace("-", "_")):
            raise ConfigError(f"--{flag} is required (or set it in --config)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None or False (nothing worth saying) or the help already
    speaks of its default. 0 is a default like any other (`0 in (None, False)` is true, hence `is`)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def settings_of(cls, args: argparse.Namespace):
    """A command's frozen settings record from its parsed flags: one field per flag of the same name,
    lists as tuples (hashable, and the record cannot be changed through them)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def add_loss_flags(g: argparse.ArgumentParser) -> None:
    """The flags of heads.losses.make_loss, for every trainer that uses it (`g` may be a group)."""
    g.add_argument("--loss", default="weighted_bce", help="bce | weighted_bce | wcel | focal | msml, or two joined by '+'")
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss γ")
    g.add_argument("--focal-alpha", type=float, default=None, help="focal loss α for positives (default: no α)")


def add_adam_flags(g: argparse.ArgumentParser, lr: float | None, batch_size: int, epochs: int, per: str = "step",
                   lr_help: str = "Adam learning rate") -> None:
    """Adam's flags and the run's length, for every trainer (`g` may be a group); the defaults are each one's
    (lr None: the trainer resolves it, as `lr_help` says)."""
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--betas", default="0.9,0.999", help="Adam betas, comma-separated")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"images per {per}")
    g.add_argument("--epochs", type=int, default=epochs, help="at most this many epochs")


def parse_list(value, cast, flag: str) -> list:
    """A TOML list or a comma-separated flag value (empty items skipped; None: [])."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [cast(str(v).strip()) for v in items if str(v).strip() != ""]
    except ValueError:
        raise ConfigError(f"--{flag} {value!r}: expected comma-separated {cast.__name__} values") from None


def epoch_line(row: dict, epochs: int, mark: str = "") -> str:
    """The progress line of one finished epoch (a history row of either trainer)."""
    return (f"epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}  lr {row['lr']:.1e}  {row['seconds']:.1f}s{mark}")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
