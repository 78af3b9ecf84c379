import os
import sys
import threading

import pytest

from tests.spark_profile import arrow_settings

# Spark's Python workers must run this interpreter (the project's virtualenv).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def _start_spark():
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master("local[2]").appName("cxr-features tests")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.log.level", "WARN"))
    # Arrow as the jobs get it under spark-submit: read from the product's profile, not copied here.
    for key, value in arrow_settings("local").items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


class _SparkStart(threading.Thread):
    """The session's JVM starting in the background while the first tests run: most of them use one core,
    and the start (~5-10 s) would otherwise wait for the first Spark test."""

    def __init__(self):
        super().__init__(name="spark-start", daemon=True)
        self.session, self.error, self.taken = None, None, False

    def run(self):
        try:
            self.session = _start_spark()
        except BaseException as exc:  # handed to the first test that asks for the session
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        self.taken = True  # the fixture stops it
        return self.session


_early: list[_SparkStart] = []


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any("spark" in getattr(item, "fixturenames", ()) for item in session.items):
        _early.append(_SparkStart())
        _early[0].start()


def pytest_sessionfinish(session):
    """A session started for tests that did not run (-x stopped the run first) is stopped; one still starting
    is not waited for: its JVM exits with this process (it reads its stdin, this process's pipe, to the end)."""
    start = _early[0] if _early else None
    if start is not None and not start.taken and not start.is_alive() and start.session is not None:
        start.session.stop()


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole test run: starting a JVM costs seconds."""
    session = _early[0].result() if _early else _start_spark()
    yield session
    session.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: as fast, and it does not slow to a crawl when
    another process holds the cores (two spinning intra-op threads on two busy cores took 10x longer)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
