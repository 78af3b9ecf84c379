import os
import sys

import pytest

from tests.spark_profile import arrow_settings

# Spark's Python workers must run this interpreter (the project's virtualenv).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole test run: starting a JVM costs seconds."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master("local[2]").appName("cxr-features tests")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.log.level", "WARN"))
    # Arrow as the jobs get it under spark-submit: read from the product's profile, not copied here.
    for key, value in arrow_settings("local").items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
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
