import os
import sys

import pytest

# Spark's Python workers must run this interpreter (the project's virtualenv).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole test run: starting a JVM costs seconds."""
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("cxr-features tests")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.log.level", "WARN")
               .getOrCreate())
    yield session
    session.stop()
