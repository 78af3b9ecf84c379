"""Files addressed by local path or URI, through pyarrow.fs (and fsspec for the schemes it alone knows).

    /data/nih, data/nih, file:///data/nih   the local file system (paths kept as given, made absolute)
    s3://bucket/prefix, gs://..., hdfs://...  pyarrow's own file systems (credentials, region and
                                            endpoint from the usual environment: AWS_ACCESS_KEY_ID,
                                            AWS_ENDPOINT_URL, ...; or URI query options)
    memory://..., any other fsspec scheme   fsspec's, wrapped as a pyarrow file system

A job names images and stores by URI; the driver lists and writes through these functions and the
executors read image bytes and write their Parquet files through them, so nothing assumes one POSIX
file system shared by all. An object store has no atomic rename: writers here never rely on one
(common/features/store_writer.py commits by writing a marker instead).
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from common import atomic

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_uri(path) -> bool:
    return isinstance(path, str) and bool(_SCHEME.match(path))


def is_local(path) -> bool:
    """A plain path or a file:// URI."""
    return not is_uri(path) or path.lower().startswith("file://")


def local_path(path) -> str:
    """The absolute local path of a plain path or file:// URI."""
    text = os.fspath(path)
    if is_uri(text):
        text = urlsplit(text).path
    return os.path.abspath(text)


# Schemes whose URI host is a bucket that pyarrow keeps in the path ("bucket/key"); others (hdfs) keep "/path".
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


@lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    # One instance per bucket/host and options, cached per process: building an S3 client resolves the region.
    uri = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except ValueError as exc:  # pyarrow's ArrowInvalid: a scheme it has no file system for
        if "nrecognized filesystem" not in str(exc):
            raise
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{scheme}://: no file system for this scheme in pyarrow or fsspec ({exc}); install "
                         "the package that provides it") from None


def _check_uri(path: str, parts) -> None:
    """Refuse a URI that would name another place than it reads as: a '..', '.' or empty segment (object stores
    normalize them away, so s3://a/../b is bucket b), or a bucket scheme without a bucket."""
    segments = parts.path.rstrip("/").split("/")[1:]  # a trailing slash is a folder's, not an empty name
    if any(s in ("", ".", "..") for s in segments) or parts.netloc in (".", ".."):
        raise ValueError(f"{path}: a URI with a '..', '.' or empty path segment is refused (it would name another "
                         "place than the one it reads as)")
    if parts.scheme.lower() in _BUCKET_SCHEMES and not parts.netloc:
        raise ValueError(f"{path}: names no bucket ({parts.scheme}://BUCKET/...)")


def resolve(path) -> tuple[pafs.FileSystem, str]:
    """(file system, its path) for a local path or URI, a URI checked first (_check_uri); query options (e.g.
    ?endpoint_override=) stay with the file system, not the path."""
    if is_local(path):
        return pafs.LocalFileSystem(), local_path(path)
    parts = urlsplit(path)
    _check_uri(path, parts)
    scheme = parts.scheme.lower()
    fs = _filesystem(scheme, parts.netloc, parts.query)
    if isinstance(fs, pafs.PyFileSystem):
        return fs, fs.handler.fs._strip_protocol(path.partition("?")[0])  # fsspec's own form
    if scheme in _BUCKET_SCHEMES:
        return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    return fs, parts.path.rstrip("/") or "/"


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base`/part/...; a URI keeps its scheme and query (a plain path stays a plain path)."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, _, query = base.partition("?")
    joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def check_location(path, flag: str) -> None:
    """Refuse in one line naming `flag`, before any work, a URI whose scheme has no file system, whose bucket does
    not exist, or whose store cannot be reached (a wrong endpoint, refused credentials). Local paths pass."""
    if is_local(path):
        return
    try:
        filesystem, where = resolve(path)
        if urlsplit(path).scheme.lower() in _BUCKET_SCHEMES:
            bucket = where.split("/", 1)[0]
            if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ValueError(f"bucket {bucket!r} does not exist (or these credentials do not see it)")
        filesystem.get_file_info(where)
    except (ValueError, OSError) as exc:
        reason = " ".join(str(exc).split()).removeprefix(f"{urlsplit(path).scheme}://: ").removeprefix(f"{path}: ")
        raise ValueError(f"{flag} {path}: {reason[:300]}") from None


def uri_of(base: str, fs_path: str) -> str:
    """The URI (or local path) of `fs_path`, a path on `base`'s file system as a listing returns it."""
    return _uri_maker(base)(fs_path)


def _uri_maker(base: str):
    """fs path -> URI for every path of one listing below `base`: the scheme is worked out once, not per file."""
    if is_local(base):
        return lambda fs_path: fs_path
    parts = urlsplit(base)
    query = f"?{parts.query}" if parts.query else ""
    if parts.scheme.lower() in _BUCKET_SCHEMES or isinstance(resolve(base)[0], pafs.PyFileSystem):
        return lambda fs_path: f"{parts.scheme}://{fs_path.lstrip('/')}{query}"  # the host is in the path
    return lambda fs_path: f"{parts.scheme}://{parts.netloc}{fs_path}{query}"


def info(path) -> pafs.FileInfo:
    fs, where = resolve(path)
    return fs.get_file_info(where)


def exists(path) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_dir(path) -> bool:
    return info(path).type == pafs.FileType.Directory


def is_file(path) -> bool:
    return info(path).type == pafs.FileType.File


def _listing(root, recursive: bool) -> list[pafs.FileInfo]:
    fs, where = resolve(root)
    try:
        return fs.get_file_info(pafs.FileSelector(where, recursive=recursive, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def list_files(root, recursive: bool = True) -> list[tuple[str, int]]:
    """(URI or local path, size) of every file below `root`, sorted; [] when `root` is absent."""
    to_uri = _uri_maker(os.fspath(root))
    return sorted((to_uri(f.path), f.size) for f in _listing(root, recursive) if f.type == pafs.FileType.File)


def names(folder) -> list[str]:
    """The names of the files and folders directly in `folder`, sorted; [] when it is absent."""
    return sorted(f.base_name for f in _listing(folder, recursive=False))


def read_bytes(path) -> bytes:
    fs, where = resolve(path)
    with fs.open_input_stream(where) as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Write a whole file so that a reader sees the old state or the complete new one: a local file via a
    temporary name and os.replace; an object store's PUT is atomic by itself."""
    if is_local(path):
        target = local_path(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        atomic.write_bytes(target, data)
        return
    fs, where = resolve(path)
    with fs.open_output_stream(where) as f:
        f.write(data)


def make_dirs(path) -> None:
    fs, where = resolve(path)
    fs.create_dir(where, recursive=True)


def for_writing(path) -> tuple[pafs.FileSystem, str]:
    """`resolve(path)`, with the local parent folder made (an object store has no folders to make)."""
    if is_local(path):
        os.makedirs(os.path.dirname(local_path(path)), exist_ok=True)
    return resolve(path)


def delete(path) -> None:
    """Delete a file or a folder with everything in it; nothing when absent."""
    fs, where = resolve(path)
    kind = fs.get_file_info(where).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(where)
    elif kind == pafs.FileType.File:
        fs.delete_file(where)


def readable(path):
    """What a decoder opens: a local path as it is (the decoder reads it lazily), else the object's bytes in a
    seekable io.BytesIO named by its URI (error messages name the image as the user gave it)."""
    if is_local(path):
        return local_path(path) if is_uri(path) else path
    data = io.BytesIO(read_bytes(path))
    data.name = path
    return data
