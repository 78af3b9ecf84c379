"""A Spark standalone cluster on 127.0.0.1 for tests: one master and N workers, each a subprocess of its own.

Every daemon starts in a session of its own (start_new_session), and everything it starts stays in that session:
a worker's executor JVM and the executor's Python daemon and workers (the daemon takes a process group of its
own, but not a session). So `kill_worker` SIGKILLs exactly one worker and what runs under it, as a machine that
loses power would, and `stop` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyspark

SPARK_HOME = Path(pyspark.__file__).parent  # pip's pyspark holds bin/spark-class and jars/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if state != "Z":  # a zombie is dead already; its parent reaps it
            found[pid] = cmdline.strip()
    return found


def kill_session(sid: int, timeout: float = 20.0) -> dict[int, str]:
    """SIGKILL every process of session `sid` (repeatedly: a daemon may fork while we kill); returns those killed."""
    killed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while (alive := session_processes(sid)) and time.monotonic() < deadline:
        for pid, cmd in alive.items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.setdefault(pid, cmd)  # a dying process's cmdline reads empty
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    if alive := session_processes(sid):
        raise RuntimeError(f"session {sid}: still alive after SIGKILL: {alive}")
    return killed


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no file)"


class StandaloneCluster:
    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g"):
        self.root, self.n_workers, self.cores, self.memory = Path(root), workers, cores, memory
        self.port, self.webui = free_port(), free_port()
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1",
                    "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}
        self.env.pop("PYSPARK_SUBMIT_ARGS", None)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        return subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def work_dir(self, i: int) -> Path:
        return self.root / f"worker{i}"

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui}/json/", timeout=5) as r:
            return json.load(r)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in [self.master, *self.workers]:
                if p.poll() is not None:
                    raise RuntimeError(f"a Spark daemon exited ({p.args[1]}, rc {p.returncode}) while waiting for "
                                       f"{what}\n{self.logs()}")
            try:
                if ready(self.state()):
                    return
            except OSError:
                pass  # the web UI is not up yet
            time.sleep(0.3)
        raise RuntimeError(f"no {what} after {timeout:g} s\n{self.logs()}")

    def start(self, timeout: float = 90.0) -> StandaloneCluster:
        self.master = self._spawn("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--webui-port", str(self.webui))
        self._wait("master", lambda s: s.get("status") == "ALIVE", timeout)
        for i in range(self.n_workers):
            self.work_dir(i).mkdir(parents=True, exist_ok=True)
            self.workers.append(self._spawn(
                f"worker{i}", "org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                "--cores", str(self.cores), "--memory", self.memory, "--webui-port", str(free_port()),
                "--work-dir", str(self.work_dir(i))))
        self._wait(f"{self.n_workers} workers", lambda s: s.get("aliveworkers") == self.n_workers, timeout)
        return self

    def executor_logs(self, i: int) -> list[Path]:
        """Worker i's executors' stderr files (<work-dir>/<app-id>/<executor-id>/stderr)."""
        return sorted(self.work_dir(i).glob("app-*/*/stderr"))

    def _task_lines(self, i: int, what: str) -> dict[str, tuple[int, int]]:
        """TID -> (stage id, partition index) of worker i's executors' INFO lines "<what> task <index>.<attempt>
        in stage <stage>[.<attempt>] (TID <tid>)"."""
        found = {}
        for path in self.executor_logs(i):
            for index, stage, tid in re.findall(rf"{what} task (\d+)\.\d+ in stage (\d+)(?:\.\d+)? \(TID (\d+)\)",
                                                path.read_text(errors="replace")):
                found[tid] = (int(stage), int(index))
        return found

    def running_tasks(self, i: int, python: bool = False) -> dict[str, tuple[int, int]]:
        """Tasks worker i's executors started and have not finished: TID -> (stage id, partition index);
        python=True: only those whose Python code has started (mapInPandas, an RDD's Python function)."""
        started = self._task_lines(i, "Starting Python task execution -" if python else "Executor: Running")
        ended = {*self._task_lines(i, "Executor: Finished"), *self._task_lines(i, "Executor: Exception in")}
        return {tid: task for tid, task in started.items() if tid not in ended}

    def finished_tasks(self, i: int) -> set[tuple[int, int]]:
        """(stage id, partition index) of every task worker i's executors finished."""
        return set(self._task_lines(i, "Executor: Finished").values())

    def kill_worker(self, i: int) -> dict[int, str]:
        """SIGKILL worker i's JVM, its executors' JVMs and their Python workers; returns what was killed."""
        killed = kill_session(self.workers[i].pid)
        self.workers[i].wait()
        return killed

    def logs(self, chars: int = 2500) -> str:
        parts = [f"--- {p.name} ---\n{tail(p, chars)}" for p in sorted(self.root.glob("*.log"))]
        for i in range(len(self.workers)):
            parts += [f"--- worker{i} {p.parent.name} stderr ---\n{tail(p, chars)}" for p in self.executor_logs(i)]
        return "\n".join(parts)

    def stop(self) -> None:
        for p in [*self.workers, self.master]:
            if p is not None:
                kill_session(p.pid)
                p.wait()
