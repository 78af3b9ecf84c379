"""Job configuration: defaults < an optional TOML file in conf/ < command-line flags, and the flag
helpers every command line shares (help with defaults, list values, loss flags, progress lines)."""

from __future__ import annotations

import argparse
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

    Config keys are flag names with dashes or underscores (`chunk-size` or `chunk_size`); an
    unknown key is an error naming the file and the key, so a typo never passes silently.
    Paths in the file are relative to the directory the job is started from.
    """
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        values = load_section(first.config, section)
        known = {a.dest for a in parser._actions}
        settings = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            if dest not in known or dest == "config":
                raise ConfigError(f"{first.config}: unknown setting {key!r} in [{section}]")
            settings[dest] = value
        parser.set_defaults(**settings)
    return parser.parse_args(argv)


def require(args: argparse.Namespace, *flags: str) -> None:
    """Refuse a run missing a flag that neither the command line nor the config file gave."""
    for flag in flags:
        if not getattr(args, flag.replace("-", "_")):
            raise ConfigError(f"--{flag} is required (or set it in --config)")

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or False (nothing worth saying)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_loss_flags(g: argparse.ArgumentParser) -> None:
    """The flags of heads.losses.make_loss, for every trainer that uses it (`g` may be a group)."""
    g.add_argument("--loss", default="weighted_bce", help="bce | weighted_bce | wcel | focal | msml, or two joined by '+'")
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss γ")
    g.add_argument("--focal-alpha", type=float, default=None, help="focal loss α for positives (default: no α)")


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
