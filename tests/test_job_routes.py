"""Every documented way into every job: `./spark-submit.sh jobs/<job>.py`, `python -m jobs.<job>` (here), and
`python jobs/<job>.py`, `cxr <command>` (tests/test_cli.py's HELP_LINES). A --help run proves a route's imports;
masked extraction and fine-tuning also run for real through spark-submit.sh, where the packages are imported from
build/cxr_features.zip and a job file's own folder comes first on sys.path."""

import json
import os
import subprocess
import sys

import pytest

from common.features.store import read_manifest
from tests.data_paths import REPO

JOBS = {"extract": "extract", "fine_tune": "finetune", "lung_model": "lungs"}  # job file stem -> cxr command
SAMPLE = ["--dataset", "nih", "--metadata", "sample/nih/Data_Entry_2017_v2020.csv", "--images", "sample/nih/images"]


def spark_submit(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "PYSPARK_PYTHON": sys.executable}
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    return subprocess.run(["./spark-submit.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_no_job_file_is_named_as_a_top_level_package_or_module():
    """Run as a script, a job file puts jobs/ first on sys.path, where jobs/NAME.py would shadow the package NAME."""
    top = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py")} - {"__init__"}
    assert jobs == set(JOBS)
    assert jobs & top == set()


@pytest.mark.parametrize("stem", JOBS)
def test_python_dash_m_runs_each_job(stem):
    proc = subprocess.run([sys.executable, "-m", f"jobs.{stem}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: jobs/{stem}.py ")


@pytest.mark.slow
@pytest.mark.parametrize("stem", JOBS)
def test_spark_submit_runs_each_job(stem):
    proc = spark_submit(f"jobs/{stem}.py", "--help")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"usage: jobs/{stem}.py " in proc.stdout


@pytest.mark.slow
def test_masked_extraction_through_spark_submit(tmp_path):
    out, masks = tmp_path / "store", tmp_path / "masks"
    proc = spark_submit("jobs/extract.py", "--config", "conf/sample.toml", "--out", str(out),
                        "--backbone", "mobilenet_v3_large", "--limit", "6", "--input-size", "64",
                        "--view", "masked", "--lung-model", "default", "--save-masks", str(masks))
    printed = proc.stdout + proc.stderr  # spark-submit merges the Python driver's stderr into stdout
    assert proc.returncode == 0, printed[-3000:]
    manifest = read_manifest(out)
    assert manifest["view"] == "masked" and manifest["lungs"]["label"] == "default"
    assert sum(manifest["lungs"]["qa_counts"].values()) == sum(manifest["splits"].values()) == 6
    assert len(list(masks.glob("*.png"))) == 6
    summary = printed.split("[extract] store complete", 1)[1]
    assert "of lung-masked images (lung model default)" in summary and "lung masks (QA): ok " in summary


@pytest.mark.slow
def test_fine_tune_through_spark_submit_with_the_decode_cache(tmp_path):
    out, cache = tmp_path / "ft", tmp_path / "cache"
    proc = spark_submit("jobs/fine_tune.py", *SAMPLE, "--out", str(out), "--backbone", "mobilenet_v3_large",
                        "--weights", "random:0", "--input-size", "64", "--epochs", "1", "--batch-size", "8",
                        "--limit", "16", "--split", "ratios", "--split-ratios", "0.6,0.2,0.2",
                        "--num-workers", "0", "--threads", "1", "--decode-cache", str(cache))
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    assert (out / "best.pt").is_file() and any(cache.iterdir())
    assert json.loads((out / "config.json").read_text())["settings"]["backbone"] == "mobilenet_v3_large"


def test_a_job_started_as_plain_python_runs_its_spark_workers_in_its_own_interpreter(monkeypatch):
    # `.venv/bin/python jobs/extract.py` with no venv active: Spark's workers were `python3` from PATH (no torch).
    import sys

    from jobs import workers_run_this_python

    for name in ("PYSPARK_PYTHON", "PYSPARK_GATEWAY_PORT"):
        monkeypatch.delenv(name, raising=False)
    workers_run_this_python()
    assert os.environ["PYSPARK_PYTHON"] == sys.executable
    monkeypatch.delenv("PYSPARK_PYTHON")
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "1")  # under spark-submit its own settings stand
    workers_run_this_python()
    assert "PYSPARK_PYTHON" not in os.environ
