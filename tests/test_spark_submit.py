"""The documented way in (docs/extracting.md): ./spark-submit.sh ships the packages as --py-files and runs the job."""

import os
import subprocess
import sys

import pytest

from common.features.store import read_manifest
from tests.data_paths import REPO


@pytest.mark.slow
def test_spark_submit_script_runs_the_job_on_the_bundled_sample(tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "PYSPARK_PYTHON": sys.executable}
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    proc = subprocess.run(
        ["./spark-submit.sh", "jobs/extract.py", "--config", "conf/sample.toml", "--out", str(out),
         "--backbone", "mobilenet_v3_large", "--limit", "6"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    printed = proc.stdout + proc.stderr  # spark-submit merges the Python driver's stderr into stdout
    assert proc.returncode == 0, printed[-3000:]
    assert "[extract] store complete" in printed
    manifest = read_manifest(out)
    assert manifest["backbone"] == "mobilenet_v3_large" and sum(manifest["splits"].values()) == 6
    assert manifest["config"]["chunk_size"] == 16  # from conf/sample.toml; --out and --backbone from flags
    with open(REPO / "build" / "spark-local.conf") as f:
        assert "spark.master" in f.read()


def test_unknown_profile_is_refused_with_the_list_of_profiles():
    proc = subprocess.run(["./spark-submit.sh", "--profile", "gpu-clutser", "jobs/extract.py"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no Spark profile 'gpu-clutser'" in proc.stderr and "gpu-cluster local" in proc.stderr
