"""This project's checkpoint files (fine-tune and head): written atomically, read back checked for format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from common.atomic import atomic_path


def read_torch_file(path: str | Path) -> object:
    """torch.load with weights_only=True, for both of torch.save's formats: the zip one (default
    since torch 1.6) is memory-mapped, so reading one key of a large file costs little; the legacy
    one cannot be, and is read whole. The one loader of every checkpoint in the project."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def load_versioned(path: str | Path, fmt: str, version: int, error: type[Exception], what: str) -> dict:
    """The dict saved in `path` if its "format" and "format_version" are these; else `error`, one line.

    Read with weights_only=True: such files hold tensors, numbers, strings, lists and dicts only,
    and a foreign file cannot run code on load.
    """
    try:
        obj = read_torch_file(path)
    except Exception as exc:  # unpickling errors are many-lined and of many classes
        raise error(f"{path}: cannot be read as a {what} ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt or obj.get("format_version") != version:
        raise error(f"{path}: not a {fmt} version {version} checkpoint")
    return obj


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save written whole (common/atomic.py): a kill never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
