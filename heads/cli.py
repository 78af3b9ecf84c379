"""What the trainers' command lines share: help text with defaults, the loss flags, progress lines on stderr."""

from __future__ import annotations

import argparse
import sys

from common.config import ConfigError


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
