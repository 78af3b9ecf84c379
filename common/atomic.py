"""The one way a local file is written whole: to a temporary name beside it, then renamed over it, so a
reader (or a job killed midway) sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


def temporary_name(path: str | os.PathLike) -> Path:
    """`.<name>.<pid>-<thread>.tmp` beside `path`: unique to this writer, hidden, and told by its suffix."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: <write tmp>`: renamed onto `p` when the block ends, removed if it fails."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a partial write (a full disk) is not left behind
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
