"""The one way every command ends on bad input: `prog: error: message` on stderr and exit 2.

argparse already ends a bad flag that way; `run_command` does the same for what a command finds
after parsing (a bad value in a config file, a missing or foreign file, a locked or full output),
so every command, job or head tool, speaks one convention. Tracebacks are left for bugs.
"""

from __future__ import annotations

import shlex
import sys
from typing import Callable, NoReturn

from common.runs.safe_output import OutputLockedError, is_disk_error, os_error_line


class InputError(Exception):
    """Mixed into an error class (beside RuntimeError, say) whose messages are about the input, not a bug."""


# ValueError: the project's input errors (ConfigError, StoreError, RunError, ...) subclass it.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, OutputLockedError, InputError)


def run_command(main: Callable[..., object], argv: list[str] | None, prog: str,
                also: tuple[type[BaseException], ...] = ()):
    """`main(argv, prog=prog)`'s result; bad input (BAD_INPUT, a full or read-only disk, and the error
    classes in `also`) ends the process with one line naming the command, and exit status 2."""
    try:
        return main(argv, prog=prog)
    except BAD_INPUT + also as exc:
        exit_bad_input(prog, exc)
    except OSError as exc:
        if not is_disk_error(exc):
            raise
        # A full or read-only disk is the machine's state, not a bug: say where and what.
        exit_bad_input(prog, os_error_line(exc, "--out"))


def exit_bad_input(prog: str, exc: BaseException | str) -> NoReturn:
    print(f"{prog.removeprefix('python -m ')}: error: {exc}", file=sys.stderr)
    sys.exit(2)


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command as a shell would retype it, for a run's config.json or a store's manifest."""
    return shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
