"""What the heads command lines share: help text with defaults, progress lines on stderr."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or False (nothing worth saying)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
