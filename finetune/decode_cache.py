"""The decode cache: each train and val image decoded once per data config, read back memory-mapped every epoch.

What is cached is `DataConfig.load(path)`, all of the input pipeline that does not depend on the
epoch: decode to one gray channel, pad / crop / stretch to the square, resize, centre crop. The
result, the model's eval input, is an (S, S) float32 array in [0, 1]. What is random (the training
shift and flip, `DataConfig.train_view`) and the normalization (`to_tensor`) still run per item and
epoch, on the cached array, in finetune/dataset.py.

Values are stored as float32, the exact values `load` returns, so a cached item equals the uncached
one bit for bit, and a run trains to the same weights with or without the cache (tested). uint8 and
float16 were rejected: `load` works in float mode (a resize of an 8-bit image gives values between
its gray levels; a 16-bit PNG or a DICOM has 65536 levels and more), so uint8 would move values by
up to half an 8-bit level and drop the 16-bit detail, and float16 by up to 2**-12. Measured on the
420 shared 8-bit NIH PNGs at 64 and 256 px: uint8 changes 97-98% of the values (by up to 0.00196,
0.00094 on average), float16 98-99% (by up to 0.00024, 0.000086 on average). The fine-tuned model
would then have been trained on a preprocessing other than the one extraction, evaluation and the
service give it. The price is 4 bytes a pixel: NIH's 112,120 images at 224 px are 22.5 GB
(at 64 px 1.8 GB), hence --decode-cache DIR for a disk with room and --no-decode-cache.

One cache is one folder under the cache directory, named `<S>px-<resize>-<config>-<images>`:

    values.npy       (n, S, S) float32 in NumPy's .npy format; row i is image i of the list
    ok.npy           (n,) bool; False where the image could not be read (its row is zeros)
    digests.npy      (n, 32) uint8: the SHA-256 of each row of values.npy, as built
    entries.parquet  each row's path, size and mtime, so a later cache of the same config reuses rows
    cache.json       the key's parts, written last

Key. <config> digests the whole data config (to_dict, not only its geometry: the safe side), the
pixel limit, this format's version, the version of what decoding gives (common.images.decode.DECODE_VERSION;
tests/test_finetune_cache.py holds the digest of fixed files' inputs under it, so a change to decoding
that does not bump it fails there) and the versions of Pillow, NumPy, pydicom and its pixel plugins.
Not the decoding source: a comment edit would rebuild every cache, and under spark-submit the modules
are inside a zip, without files of their own. <images>
digests every row's absolute path, byte size and mtime (ns), in order. Another input size, resize
rule or decoder never reuses a cache; a changed, added or removed file makes a new cache, into which
the rows of earlier caches of the same config whose files are unchanged are copied, not decoded.

Integrity. A cache is a file anyone can overwrite and a disk can damage, and a changed row keeps its
size and mtime: every process that opens a cache (each DDP rank) checks all its rows against their
digests first, before a step trains on them. A cache whose rows changed is logged and built again,
under the lock, from its rows that still match (and earlier caches' rows, also checked), as a missing
one is: it is derived data, and what it should hold is known. The check is one pass over the file per
open, in `workers` threads: SHA-256 at ~1.7 GB/s a core, 0.11 ms an image at 224 px, 0.6 ms at 512 px
(bench/finetune_cache.py --digest-cost). Checking each row as it is read instead would cost that every
epoch, in the loader workers the cache is there to relieve (a cached item costs ~0.2 ms at 224 px),
and catch one thing more: a row changed during a run, which is caught here at the next open.

Concurrency. A cache is built in a private folder `.building-<name>-<host>-<pid>`, flushed to disk,
then renamed to its name: a folder of that name is complete. One process builds a given cache at a
time, holding an exclusive flock on `.<name>.lock`; other processes (the other DDP ranks, a second
run) wait on that lock and then read what it built. A killed builder leaves its temporary folder,
never the final name; the next builder, holding the lock, deletes it. A cache that cannot be written
(disk full, no permission) is a warning, and that run decodes every epoch as without the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from common.images.data_config import DataConfig
from common.images.decode import DECODE_VERSION, MAX_PIXELS
from common.runs.safe_output import os_error_line

FORMAT = "cxr-features/decode-cache"
FORMAT_VERSION = 2  # 2: digests.npy
DEFAULT_DIR = "decode-cache"  # beside the run directory (in its parent folder) unless --decode-cache names one
BUILDING = ".building-"
VALUES, OK, DIGESTS, ENTRIES, META = "values.npy", "ok.npy", "digests.npy", "entries.parquet", "cache.json"
# The decoders whose versions key a cache (with common.images.decode.DECODE_VERSION for this code).
DECODERS = ("pillow", "numpy", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")


def _quiet(_message: str) -> None:
    pass


class DecodeCache:
    """A finished cache, opened read-only: `get(i)` is `DataConfig.load(paths[i])`, or None where that raised.

    The values are memory-mapped on first use in each process: a DataLoader worker (forked or
    spawned) maps the file itself instead of receiving a copy of it.
    """

    def __init__(self, folder: Path, n: int, size: int):
        self.folder, self.n, self.size = Path(folder), n, size
        if not (self.folder / META).is_file():
            raise ValueError(f"no {META}")
        self.ok = np.load(self.folder / OK)
        self._values = None
        values = self.values  # checks the shape now, in the opening process
        if values.shape != (n, size, size) or values.dtype != np.float32 or self.ok.shape != (n,):
            raise ValueError(f"holds {values.shape} {values.dtype}, expected ({n}, {size}, {size}) float32")

    def changed_rows(self, threads: int = 1) -> np.ndarray:
        """The rows whose bytes no longer have the digest written when the cache was built."""
        built = np.load(self.folder / DIGESTS)  # not kept: the loader workers have no use for it
        if built.shape != (self.n, 32):
            raise ValueError(f"{DIGESTS} holds {built.shape}, expected ({self.n}, 32)")
        return np.flatnonzero((_digests(self.values, threads) != built).any(axis=1))

    @property
    def values(self) -> np.ndarray:
        if self._values is None:
            self._values = np.load(self.folder / VALUES, mmap_mode="r")
        return self._values

    def get(self, i: int) -> np.ndarray | None:
        if not self.ok[i]:
            return None
        return np.array(self.values[i])  # a private, writable copy; the map is read-only

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_values": None}


def _digest(row: np.ndarray) -> bytes:
    return hashlib.sha256(row).digest()


def _digests(values: np.ndarray, threads: int) -> np.ndarray:
    """(n, 32) uint8: each row's SHA-256; hashlib lets go of the GIL, so `threads` rows are hashed at once."""
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        return np.frombuffer(b"".join(pool.map(_digest, values)), np.uint8).reshape(len(values), 32)


# --- the key ------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def config_digest(data_config: DataConfig, max_pixels: int = MAX_PIXELS) -> str:
    """What decides the values of any one image: the data config, the pixel limit and the decoding's versions."""
    key = {"format": FORMAT, "format_version": FORMAT_VERSION, "data_config": data_config.to_dict(),
           "max_pixels": max_pixels, "decode_version": DECODE_VERSION,
           "versions": {package: _version(package) for package in DECODERS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def image_entries(paths) -> pd.DataFrame:
    """Each path made absolute, with its size and mtime in ns (-1 and -1 for a file that cannot be stat'ed)."""
    rows = []
    for p in paths:
        p = os.path.abspath(p)
        try:
            st = os.stat(p)
            rows.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            rows.append((p, -1, -1))
    return pd.DataFrame(rows, columns=["path", "size", "mtime_ns"]).astype({"size": np.int64, "mtime_ns": np.int64})


def _entries_digest(entries: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for p, size, mtime in entries.itertuples(index=False):
        digest.update(f"{p}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def cache_name(data_config: DataConfig, entries: pd.DataFrame, max_pixels: int = MAX_PIXELS) -> str:
    return (f"{data_config.input_size}px-{data_config.resize}-{config_digest(data_config, max_pixels)[:12]}-"
            f"{_entries_digest(entries)[:16]}")


# --- opening and building ---------------------------------------------------------------------------


class _Damaged(Exception):
    """A cache folder that is there but must not be read: why, in one line."""


def _read(folder: Path, n: int, size: int, threads: int = 1, check: bool = True) -> DecodeCache | None:
    """The finished cache in `folder`, its rows checked against their digests; None when there is none.
    Raises _Damaged for a folder this code cannot read or whose rows changed."""
    if not folder.exists():
        return None
    try:
        cache = DecodeCache(folder, n, size)
        bad = cache.changed_rows(threads) if check else []
    except (OSError, ValueError) as exc:
        why = os_error_line(exc, folder) if isinstance(exc, OSError) else " ".join(str(exc).split())
        raise _Damaged(f"cannot be read ({why})") from None
    if len(bad):
        raise _Damaged(f"{len(bad)} of {n} rows (the first: row {bad[0]}) are not what was built: they changed on disk")
    return cache


@contextmanager
def _locked(path: Path, name: str, log: Callable[[str], None]):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"decode cache: waiting for another process building {name}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_cache(paths, data_config: DataConfig, directory: str | os.PathLike, workers: int = 0,
               log: Callable[[str], None] = print, announce: bool = True, progress_seconds: float = 30.0,
               max_pixels: int = MAX_PIXELS) -> DecodeCache | None:
    """The cache of `paths` under `data_config` in `directory`, built first if absent (decoding with
    `workers` DataLoader processes); None when there is nothing to cache or it cannot be written.

    `log` takes the building process's lines (start, progress every `progress_seconds`, end, warnings);
    with announce=False the other lines (reused, waiting) are left out, for the ranks that are not 0.
    """
    paths = list(paths)
    if not paths:
        return None
    say = log if announce else _quiet
    directory = Path(directory)
    size = data_config.input_size
    entries = image_entries(paths)
    name = cache_name(data_config, entries, max_pixels)
    final = directory / name
    threads = max(workers, 1)
    try:
        try:
            cache = _read(final, len(paths), size, threads)
        except _Damaged:
            cache = None  # checked again, and built again, under the lock
        if cache is None:
            directory.mkdir(parents=True, exist_ok=True)
            with _locked(directory / f".{name}.lock", name, say):
                damaged = None
                try:
                    cache = _read(final, len(paths), size, threads)  # built (again) while this process waited?
                except _Damaged as exc:
                    damaged = str(exc)
                if cache is None:
                    salvage = _clear_leftovers(directory, name, damaged, log)
                    try:
                        _build(directory, name, entries, data_config, workers, log, progress_seconds, max_pixels,
                               salvage)
                    finally:
                        if salvage:
                            shutil.rmtree(salvage, ignore_errors=True)
                    return _read(final, len(paths), size, check=False)  # just hashed by its builder
        say(f"decode cache: reading {final} ({len(paths)} images, {_bytes((final / VALUES).stat().st_size)}, "
            f"{int((~cache.ok).sum())} unreadable)")
        return cache
    except OSError as exc:
        log(f"decode cache: {os_error_line(exc, directory)}; decoding every image every epoch instead")
        return None


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _clear_leftovers(directory: Path, name: str, damaged: str | None, log: Callable[[str], None]) -> Path | None:
    """With the lock held: a killed builder's temporary folder goes, and a final folder that must not be
    read (`damaged` says why) is renamed aside, out of readers' way; returned, for its intact rows."""
    for stale in directory.glob(f"{BUILDING}{name}-*"):
        log(f"decode cache: removing {stale.name}, left by a build that did not finish")
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / name
    if not final.exists():
        return None
    log(f"decode cache: {final} {damaged}; building it again")
    aside = directory / f"{BUILDING}{name}-damaged-{os.getpid()}"  # a killed build's leftover too
    os.replace(final, aside)
    return aside


class _Decode(Dataset):
    """(row, the input of paths[row] or None): the uncached path's own call and its own catch-all."""

    def __init__(self, paths, rows, data_config: DataConfig, max_pixels: int):
        self.paths, self.rows, self.data_config, self.max_pixels = paths, rows, data_config, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        row = int(self.rows[k])
        try:
            return row, self.data_config.load(self.paths[row], self.max_pixels)
        except Exception:  # as finetune/dataset.py: an unreadable image, masked out of training
            return row, None


def _as_is(item):
    return item


def _earlier_rows(directory: Path, name: str, entries: pd.DataFrame, values: np.ndarray, ok: np.ndarray,
                  salvage: Path | None) -> int:
    """Copy into `values` the readable rows whose files are unchanged and whose bytes still have their
    digest, from `salvage` (this cache, damaged) and the finished caches of the same config."""
    prefix = name.rsplit("-", 1)[0] + "-"
    want = {key: row for row, key in enumerate(entries.itertuples(index=False, name=None))}
    copied = 0
    earlier = [other for other in sorted(directory.glob(prefix + "*")) if other.name != name]
    for other in ([salvage] if salvage else []) + earlier:
        if not (other / META).is_file() or not want:
            continue
        try:
            theirs = pd.read_parquet(other / ENTRIES)
            their_ok, their_digests = np.load(other / OK), np.load(other / DIGESTS)
            their_values = np.load(other / VALUES, mmap_mode="r")
        except (OSError, ValueError):
            continue
        if their_values.shape[1:] != values.shape[1:] or not len(their_values) == len(theirs) == len(their_digests):
            continue
        for k, key in enumerate(theirs.itertuples(index=False, name=None)):
            row = want.get(key)
            if (row is not None and key[1] >= 0 and their_ok[k]
                    and _digest(their_values[k]) == their_digests[k].tobytes()):  # as built: unchanged on disk
                values[row] = their_values[k]
                ok[row] = True
                del want[key]
                copied += 1
    return copied


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(directory: Path, name: str, entries: pd.DataFrame, data_config: DataConfig, workers: int,
           log: Callable[[str], None], progress_seconds: float, max_pixels: int, salvage: Path | None) -> None:
    n, size = len(entries), data_config.input_size
    tmp = directory / f"{BUILDING}{name}-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        values = np.lib.format.open_memmap(tmp / VALUES, mode="w+", dtype=np.float32, shape=(n, size, size))
        ok = np.zeros(n, bool)
        reused = _earlier_rows(directory, name, entries, values, ok, salvage)
        todo = np.flatnonzero(~ok)
        log(f"decode cache: building {directory / name}: {len(todo)} of {n} images to decode"
            + (f" ({reused} unchanged, copied from {'its intact rows or ' if salvage else ''}an earlier cache)"
               if reused else "")
            + f", {_bytes(n * size * size * 4)}, {max(workers, 1)} decoding process(es)")
        paths = entries["path"].tolist()
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, and the
        # run that builds the cache would then train with other dropout masks than the runs that read it.
        loader = DataLoader(_Decode(paths, todo, data_config, max_pixels), batch_size=None, num_workers=workers,
                            collate_fn=_as_is, generator=torch.Generator())
        done, last = 0, time.perf_counter()
        for row, image in loader:
            if image is not None:
                values[row] = image
                ok[row] = True
            done += 1
            now = time.perf_counter()
            if progress_seconds and now - last >= progress_seconds and done < len(todo):
                rate = done / (now - start)
                eta = time.strftime("%H:%M:%S", time.gmtime((len(todo) - done) / max(rate, 1e-9)))
                log(f"decode cache: {done}/{len(todo)} images, {rate:.1f} images/s, ETA {eta}")
                last = now
        values.flush()
        np.save(tmp / DIGESTS, _digests(values, workers))
        del values
        np.save(tmp / OK, ok)
        entries.to_parquet(tmp / ENTRIES, index=False)
        seconds = time.perf_counter() - start
        (tmp / META).write_text(json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "images": n,
            "shape": [n, size, size], "dtype": "float32", "data_config": data_config.to_dict(),
            "config_sha256": config_digest(data_config, max_pixels), "max_pixels": max_pixels,
            "unreadable": int((~ok).sum()), "decoded": int(len(todo)), "reused": reused,
            "seconds": round(seconds, 2)}, indent=2) + "\n")
        for f in (VALUES, OK, DIGESTS, ENTRIES, META):
            _fsync(tmp / f)
        _fsync(tmp)
        os.rename(tmp, directory / name)  # complete, or not there at all
        _fsync(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
    bad = int((~ok).sum())
    log(f"decode cache: built {name} in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.1f} images/s)"
        + (f"; {bad} unreadable, masked out of training as without the cache" if bad else ""))
