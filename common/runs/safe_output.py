"""Output directories a job may write into: checked paths, one-line OS errors, one writer at a time.

Every job that writes a store or a run directory holds an `OutputLock` on it for the whole run:
a lock file created with O_CREAT | O_EXCL (atomic on local disks and on NFS v3+, Lustre, GPFS),
holding host, pid, start time and command, its mtime refreshed by a heartbeat thread. A second
job on the same folder stops at once with a line naming the first. A lock is stale, and taken
over, when its heartbeat stopped (a job killed with its machine, or a pid reused by another
process) or, on the same host, its process is gone or its pid now names a process started at
another time; taking over renames the stale file first, so two jobs that both see it
stale cannot both win.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK = ".cxr.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # twenty missed heartbeats: a job on another host is gone


class OutputLockedError(RuntimeError):
    """Another job writes this folder; the message names it."""


def os_error_line(exc: OSError, path: str | os.PathLike) -> str:
    """An OSError as one line that says what happened and where: "no space left on device", ..."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    where = exc.filename or path
    return f"{where}: {reason}"


def check_dir_path(out: str | os.PathLike, flag: str = "--out") -> Path:
    """`out` as a Path, refused in one line when it or a folder above it is a file."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == out else f"is under {p}, which is a file"
            raise NotADirectoryError(f"{flag} {out}: {what}, not a folder")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc); None where unknown. A pid is
    reused once its process is gone: with its start time a record names one process, not one number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after the "(command)"
    except (OSError, ValueError, IndexError):
        return None


def _is_stale(holder: dict, host: str, stale_seconds: float) -> bool:
    """A lock record (with its `age` in seconds) whose job is gone: its heartbeat stopped (any host), or, on this
    host, its process is gone or its pid now belongs to a process that started at another time."""
    if holder["age"] > stale_seconds:
        return True  # a live holder refreshes every HEARTBEAT_SECONDS, whatever has its pid now
    pid = holder.get("pid")
    if holder.get("host") != host or not isinstance(pid, int):
        return False
    if not _alive(pid):
        return True
    started = holder.get("pid_start")
    return isinstance(started, int) and process_start(pid) not in (None, started)


class _HeldLock:
    """What the local and the object-store lock share: the holder's record, the refusal naming the other job, a
    heartbeat thread that calls `_refresh` while the lock is held (it returns False to stop), and `with`."""

    def __init__(self, folder, path, log, stale_seconds: float, heartbeat_seconds: float):
        self.folder, self.path = folder, path
        self.log, self.stale_seconds, self.heartbeat_seconds = log, stale_seconds, heartbeat_seconds
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                       "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv)[:500]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _busy(self, holder: dict, remedy: str) -> OutputLockedError:
        return OutputLockedError(
            f"{self.folder}: another job is writing here (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('started')}: {holder.get('command', '?')[:120]}); wait for it, or {remedy} "
            f"{self.path} if that job is gone")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self._refresh():
                return

    def _refresh(self) -> bool:
        raise NotImplementedError

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class OutputLock(_HeldLock):
    """`with OutputLock(folder): ...` holds `folder`/.cxr.lock for the block (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, log=lambda m: print(m, file=sys.stderr),
                 stale_seconds: float = STALE_SECONDS, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        super().__init__(Path(folder), Path(folder) / LOCK, log, stale_seconds, heartbeat_seconds)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def _holder(self) -> dict | None:
        """The lock's record, or None when it vanished meanwhile; {} when unreadable (being written)."""
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}
        return {**holder, "age": time.time() - mtime}

    def _stale(self, holder: dict) -> bool:
        return _is_stale(holder, self.record["host"], self.stale_seconds)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            holder = self._holder()
            if holder is None:
                continue  # released just now: try again
            if not self._stale(holder):
                raise self._busy(holder, "remove")
            stale = self.path.with_name(f"{LOCK}.stale-{self.record['host']}-{os.getpid()}")
            try:
                os.rename(self.path, stale)  # only one taker wins this rename
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            self.log(f"{self.folder}: took over the stale lock of host {holder.get('host')}, pid {holder.get('pid')}")
        else:
            raise OutputLockedError(f"{self.folder}: could not take {self.path} (other jobs keep taking it)")
        self._start_heartbeat()

    def _refresh(self) -> bool:
        try:
            os.utime(self.path)
        except OSError:
            pass  # the folder is gone or read-only now; the job itself will say so
        return True

    def release(self) -> None:
        self._stop_heartbeat()
        holder = self._holder()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)


class RemoteLock(_HeldLock):
    """`OutputLock` for a folder on an object store (s3://, gs://, ...), which has no exclusive create: the lock
    object is checked, then written, then read back; its record's `beat` time is refreshed by a heartbeat.
    Two jobs started within the same moment may both pass the check: the last writer keeps the lock, and the other
    finds at its next heartbeat that it lost it (`lost`; the extraction then stops before its next commit). Stale
    locks are told as the local lock tells them."""

    def __init__(self, folder: str, log=lambda m: print(m, file=sys.stderr), stale_seconds: float = STALE_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        from common import fs

        super().__init__(folder, fs.join(folder, LOCK), log, stale_seconds, heartbeat_seconds)
        self.fs, self.lost = fs, False
        self.record["token"] = os.urandom(8).hex()

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.fs.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _write(self) -> None:
        self.fs.write_bytes(self.path, json.dumps({**self.record, "beat": time.time()}).encode())

    def acquire(self) -> None:
        holder = self._holder()
        if holder and holder.get("token") != self.record["token"]:
            holder["age"] = time.time() - float(holder.get("beat", 0))
            if not _is_stale(holder, self.record["host"], self.stale_seconds):
                raise self._busy(holder, "delete")
            self.log(f"{self.folder}: took over the stale lock of host {holder.get('host')}, pid {holder.get('pid')}")
        self._write()
        if (self._holder() or {}).get("token") != self.record["token"]:
            raise OutputLockedError(f"{self.folder}: another job took {self.path} at the same moment; wait for it")
        self._start_heartbeat()

    def _refresh(self) -> bool:
        try:
            if (self._holder() or {}).get("token") != self.record["token"]:
                self.lost = True
                self.log(f"{self.folder}: another job took {self.path}; this one stops")
                return False
            self._write()
        except OSError:
            pass  # the store is unreachable now; the job itself will say so
        return True

    def release(self) -> None:
        self._stop_heartbeat()
        try:
            if (self._holder() or {}).get("token") == self.record["token"]:
                self.fs.delete(self.path)
        except OSError:
            pass


def is_disk_error(exc: OSError) -> bool:
    """Errors of the file system rather than of the input: full, read-only, permission, quota."""
    return exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
