"""common/runs/safe_output.py: the one-writer lock, checked --out paths and one-line OS errors."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.runs.safe_output import (LOCK, OutputLock, OutputLockedError, check_dir_path, is_disk_error,
                                os_error_line, process_start)
from tests.data_paths import REPO

HOST = socket.gethostname()


def dead_pid() -> int:
    """A pid no process has on this host: one above the kernel's largest."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2 ** 22 + 1  # Linux's largest pid_max


def write_lock(folder: Path, host: str, pid: int, age_seconds: float = 0.0, **record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00",
                                "command": "jobs/extract.py --out x", **record}))
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_a_lock_held_by_another_live_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom common.runs.safe_output import OutputLock\n"
         "OutputLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)", str(tmp_path / "run")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError) as info:
            OutputLock(tmp_path / "run").acquire()
        line = str(info.value)
        assert f"another job is writing here (host {HOST}, pid {holder.pid}, since " in line and "\n" not in line
        assert f"remove {tmp_path / 'run' / LOCK} if that job is gone" in line
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: its lock is now a dead pid's, and taken over.
    logged = []
    with OutputLock(tmp_path / "run", log=logged.append):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert logged == [f"{tmp_path / 'run'}: took over the stale lock of host {HOST}, pid {holder.pid}"]


def test_a_dead_pid_on_this_host_is_stale_and_taken_over_with_a_line(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, HOST, pid)  # fresh mtime: on this host the pid decides, not the heartbeat
    logged = []
    lock = OutputLock(tmp_path, log=logged.append)
    lock.acquire()
    try:
        record = json.loads((tmp_path / LOCK).read_text())
        assert (record["host"], record["pid"]) == (HOST, os.getpid())
        assert logged == [f"{tmp_path}: took over the stale lock of host {HOST}, pid {pid}"]
        assert [p.name for p in tmp_path.iterdir()] == [LOCK]  # the renamed stale file is gone
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="no /proc: process start times unknown")
def test_a_dead_jobs_pid_reused_by_another_process_is_stale(tmp_path):
    # The pid is alive (it is this test's), but the job that wrote the lock started at another time.
    write_lock(tmp_path, HOST, os.getpid(), pid_start=process_start(os.getpid()) - 1)
    logged = []
    with OutputLock(tmp_path, log=logged.append):
        assert json.loads((tmp_path / LOCK).read_text())["pid_start"] == process_start(os.getpid())
    assert logged == [f"{tmp_path}: took over the stale lock of host {HOST}, pid {os.getpid()}"]
    # The same process, alive and beating: refused.
    write_lock(tmp_path, HOST, os.getpid(), pid_start=process_start(os.getpid()))
    with pytest.raises(OutputLockedError, match=f"host {HOST}, pid {os.getpid()}"):
        OutputLock(tmp_path).acquire()


def test_a_same_host_lock_whose_heartbeat_stopped_is_stale_though_its_pid_lives(tmp_path):
    write_lock(tmp_path, HOST, os.getpid(), age_seconds=3600)  # an old record without pid_start, its pid reused
    logged = []
    with OutputLock(tmp_path, log=logged.append):
        pass
    assert logged == [f"{tmp_path}: took over the stale lock of host {HOST}, pid {os.getpid()}"]


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    write_lock(tmp_path, "node-elsewhere", 1, age_seconds=60)  # a live job there beats every 30 s
    with pytest.raises(OutputLockedError, match="host node-elsewhere, pid 1"):
        OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-elsewhere"  # left alone

    write_lock(tmp_path, "node-elsewhere", 1, age_seconds=3600)  # silent for an hour: its machine is gone
    logged = []
    with OutputLock(tmp_path, log=logged.append):
        assert json.loads((tmp_path / LOCK).read_text())["host"] == HOST
    assert logged == [f"{tmp_path}: took over the stale lock of host node-elsewhere, pid 1"]


def test_release_removes_only_our_own_lock(tmp_path):
    lock = OutputLock(tmp_path)
    lock.acquire()
    lock.release()
    assert not (tmp_path / LOCK).exists()
    lock = OutputLock(tmp_path)
    lock.acquire()
    # Someone took it over meanwhile (say, after deciding ours was stale): theirs must stay.
    write_lock(tmp_path, "node-elsewhere", 4242)
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 4242


def test_the_heartbeat_refreshes_the_lock(tmp_path):
    with OutputLock(tmp_path, heartbeat_seconds=0.01) as lock:
        os.utime(lock.path, (1, 1))
        deadline = time.monotonic() + 30  # a bound against a hang, not a measurement
        while lock.path.stat().st_mtime == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.path.stat().st_mtime > 1


def test_out_that_is_a_file_or_under_one_is_refused_in_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^--out .*/f: is a file, not a folder$"):
        check_dir_path(tmp_path / "f")
    with pytest.raises(NotADirectoryError, match=rf"^--run {tmp_path / 'f' / 'a' / 'b'}: is under {tmp_path / 'f'}, "
                                                 r"which is a file, not a folder$"):
        check_dir_path(tmp_path / "f" / "a" / "b", flag="--run")
    assert check_dir_path(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"


def test_disk_errors_are_one_line_naming_path_and_reason():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/head.pt")
    assert os_error_line(full, "--out") == "/runs/x/head.pt: no space left on device"
    assert os_error_line(OSError(errno.EROFS, "Read-only file system"), "/runs/x") == "/runs/x: read-only file system"
    assert is_disk_error(full) and is_disk_error(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_disk_error(FileNotFoundError(errno.ENOENT, "No such file or directory"))
