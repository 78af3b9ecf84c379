"""The job shells: flags to a plan, the Spark session or the distributed run, and the rooms below."""

import os
import sys


def workers_run_this_python() -> None:
    """A job started as plain Python (`python jobs/X.py`, `python -m jobs.X`, `cxr X`) starts its own Spark, whose
    Python workers would be `python3` from PATH (without torch outside an active venv): run them in this
    interpreter. Under spark-submit (PYSPARK_GATEWAY_PORT set) the launcher's own settings stand."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
