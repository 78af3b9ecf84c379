"""Job configuration: defaults < an optional TOML file in conf/ < command-line flags."""

from __future__ import annotations

import argparse
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
