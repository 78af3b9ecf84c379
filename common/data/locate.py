"""Finding each metadata row's image file under an images root.

One directory walk builds an index, so 10^5 rows cost no per-row `stat`. NIH rows are matched
by file name anywhere below the root (the Kaggle copy splits the PNGs over images_001/images ...
images_012/images); CheXpert rows by their relative path, with or without the leading
`CheXpert-v1.0-small/` folder, since file names like view1_frontal.jpg repeat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common import fs
from common.images.dicom import DICOM_SUFFIXES

# Every job's list (extraction, fine-tuning, heads.predict --images); DICOM decodes via common/images/dicom.py.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)


@dataclass
class Located:
    table: pd.DataFrame  # rows whose image was found, with an absolute `path`
    missing: int  # rows whose image is absent (users often hold a subset)
    missing_examples: list[str]


def is_image_file(path: str | os.PathLike | os.DirEntry) -> bool:
    """The one rule for what is an image file, in every job: a known suffix and a regular file
    (following symlinks), so a FIFO or device named *.png is never opened and a dangling link is not one.
    A DirEntry from `walk_files` answers from the directory listing, without a stat per file."""
    return os.fspath(path).lower().endswith(IMAGE_SUFFIXES) and is_regular_file(path)


def is_regular_file(path: str | os.PathLike | os.DirEntry) -> bool:
    """A regular file, following symlinks (no FIFO, device or dangling link); False when it cannot be told."""
    try:
        return path.is_file(follow_symlinks=True) if isinstance(path, os.DirEntry) else os.path.isfile(path)
    except OSError:
        return False


def walk_files(root: str | os.PathLike):
    """Every non-directory entry below `root` (os.DirEntry, sorted per folder), following symlinks but entering each
    directory once: a link back up the tree (`ln -s . loop`) cannot make the walk endless."""
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue  # vanished or unreadable: nothing to index there
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    subdirs.append(entry.path)
                    continue
            except OSError:
                pass
            yield entry
        stack.extend(reversed(subdirs))


def _walk(root: Path):
    for entry in walk_files(root):
        if is_image_file(entry):
            yield entry.path


def _listed(root: str) -> list[tuple[str, str]]:
    """(path, path relative to `root` with / separators) of every image file below a local folder or a URI
    prefix (one listing call per 1,000 objects on S3; no per-file request)."""
    if fs.is_local(root):
        return [(path, os.path.relpath(path, root).replace(os.sep, "/")) for path in _walk(Path(root))]
    prefix = len(root.partition("?")[0].rstrip("/")) + 1
    return [(uri, uri.partition("?")[0][prefix:]) for uri, _ in fs.list_files(root)
            if uri.partition("?")[0].lower().endswith(IMAGE_SUFFIXES)]


def _absolute(key: str) -> str | None:
    """A table's absolute path or URI when it names an image file, else None."""
    if fs.is_uri(key) and not fs.is_local(key):
        try:
            return key if key.partition("?")[0].lower().endswith(IMAGE_SUFFIXES) and fs.is_file(key) else None
        except (OSError, ValueError):
            return None
    key = fs.local_path(key)
    return key if is_image_file(key) else None


def locate_images(table: pd.DataFrame, root: str | os.PathLike, by: str, key: str = "image_id") -> Located:
    """Attach `path` to each row whose image exists below `root` (a folder or a URI prefix such as
    s3://bucket/images), matching the row's `key` column.

    `by`: 'name' (file name anywhere below), 'relpath' (path relative to `root`; an absolute path or a URI is
    taken as it is, so a table may name files outside the root), or 'found' (the reader walked the files and
    set `path`).
    """
    root = fs.local_path(root) if fs.is_local(root) else str(root)
    if not fs.is_dir(root):
        raise FileNotFoundError(f"--images {root}: not a directory")
    if by == "found":
        return Located(table.reset_index(drop=True), 0, [])
    files = _listed(root)
    name = os.path.basename(root.partition("?")[0].rstrip("/"))
    if by == "name":
        index: dict[str, str] = {}
        for path, rel in files:  # the first copy wins when a name repeats
            index.setdefault(rel.rsplit("/", 1)[-1], path)
    elif by == "relpath":
        index = {}
        for path, rel in files:
            index.setdefault(rel, path)
            # CSV paths start with the release folder, which may be the root itself or above it.
            index.setdefault(f"{name}/{rel}", path)
    else:
        raise ValueError(f"locate_images: by must be 'name', 'relpath' or 'found', not {by!r}")
    keys = table[key] if by == "relpath" else table[key].map(lambda k: k.partition("?")[0].rsplit("/", 1)[-1])
    paths = keys.map(index)
    if by == "relpath":
        absolute = paths.isna() & keys.map(lambda k: os.path.isabs(k) or fs.is_uri(k))
        # One stat per absolute path not already found by the walk (those under the root are not in the index
        # by this spelling); a directory or a FIFO is no image here either.
        paths[absolute] = keys[absolute].map(_absolute)
    found = paths.notna()
    located = table[found.to_numpy()].assign(path=paths[found]).reset_index(drop=True)
    missing = table.loc[~found, key]
    return Located(located, int(len(missing)), missing.head(5).tolist())
