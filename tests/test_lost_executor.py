"""A worker lost mid-run: the extraction on a Spark standalone cluster (a master and two one-core workers on
127.0.0.1) loses one worker's JVM, executor and Python workers to SIGKILL while a task of theirs is embedding;
the job must finish on the other worker and the store must hold every row exactly once, with the features a
direct run of the backbone gives. The cluster runs with the fault-tolerance settings of the GPU-cluster
profile (conf/spark/gpu-cluster.conf), so the settings documented there are the ones tested."""

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from common.images.data_config import DataConfig
from common.models.inference import FeatureExtractor
from common.features.store import read_errors, read_manifest, read_split
from tests.data_paths import NIH_IMAGES, REPO, needs_shared, write_nih_subset
from tests.spark_cluster import StandaloneCluster, kill_session, tail
from tests.spark_profile import arrow_settings, read_profile

BACKBONE = "resnet50"  # random resnet50 features differ from image to image (mobilenet's are ~1e-10 everywhere)
N_IMAGES = 96
CHUNK = 48  # 3 chunks (48, 48, the corrupt file); the kill lands in chunk 2
CORRUPT = "00099999_000.png"
# The GPU profile's keys that decide what happens when an executor is lost: the test cluster runs with them.
FAULT_TOLERANCE = ("spark.task.maxFailures", "spark.speculation", "spark.excludeOnFailure.enabled",
                   "spark.network.timeout", "spark.executor.heartbeatInterval")


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|min|h)?", value).groups()
    return int(number) * {"ms": 1e-3, "s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[unit]


def test_gpu_profile_sets_what_a_lost_executor_needs():
    conf = read_profile("gpu-cluster")
    assert set(FAULT_TOLERANCE) <= set(conf), sorted(set(FAULT_TOLERANCE) - set(conf))
    assert int(conf["spark.task.maxFailures"]) >= 2  # a lost executor's task may count as a failure
    assert conf["spark.speculation"] == "false"
    assert conf["spark.excludeOnFailure.enabled"] == "true"
    # Heartbeats must come well inside the timeout that declares an executor dead.
    assert seconds(conf["spark.executor.heartbeatInterval"]) * 4 <= seconds(conf["spark.network.timeout"])


@pytest.fixture
def dataset(tmp_path):
    """96 real NIH images (copied: the job and the check read the same files) and one truncated file."""
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    picked = sorted(os.listdir(NIH_IMAGES))[::4][:N_IMAGES]
    for name in picked:
        shutil.copy(NIH_IMAGES / name, root / "images" / name)
    (root / "images" / CORRUPT).write_bytes((NIH_IMAGES / picked[0]).read_bytes()[:5000])
    write_nih_subset(root, picked, CORRUPT, lists=True)
    return root, picked


@pytest.fixture
def cluster(tmp_path):
    c = StandaloneCluster(tmp_path / "cluster", workers=2, cores=1, memory="2g")
    c.root.mkdir()
    try:
        yield c.start()
    finally:
        c.stop()


def submit_args(cluster: StandaloneCluster) -> str:
    profile = read_profile("gpu-cluster")
    conf = {
        **{k: profile[k] for k in FAULT_TOLERANCE}, **arrow_settings("gpu-cluster"),
        "spark.ui.enabled": "false", "spark.driver.host": "127.0.0.1",
        "spark.executor.cores": "1", "spark.executor.memory": "1g",
        # Start only when both executors are up, so both run tasks of the first chunks.
        "spark.scheduler.minRegisteredResourcesRatio": "1.0",
        "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s",
        "spark.executorEnv.PYTHONPATH": str(REPO),
    }
    return " ".join(["--master", cluster.url, *(f"--conf {k}={v}" for k, v in conf.items()), "pyspark-shell"])


@pytest.mark.cluster
@pytest.mark.usefixtures("one_torch_thread")
@needs_shared
def test_store_has_every_row_once_after_a_worker_is_killed_midway(dataset, cluster, tmp_path):
    root, picked = dataset
    out = tmp_path / "store"
    env = {**os.environ, "PYSPARK_SUBMIT_ARGS": submit_args(cluster), "PYTHONPATH": str(REPO),
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    driver_log = tmp_path / "driver.log"
    args = ["--dataset", "nih", "--metadata", str(root / "Data_Entry_2017_v2020.csv"), "--images", str(root / "images"),
            "--out", str(out), "--backbone", BACKBONE, "--weights", "random:0", "--input-size", "64",
            "--precision", "fp32", "--val-fraction", "0.2", "--chunk-size", str(CHUNK), "--images-per-task", "6",
            "--progress-interval", "2"]
    with driver_log.open("w") as log:
        driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "extract.py"), *args], env=env, cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)

    def report(what: str) -> str:
        return f"{what}\n--- driver ---\n{tail(driver_log, 6000)}\n{cluster.logs()}"

    try:
        # Midway: chunk 1 is committed, and a worker has just started embedding a task of chunk 2 (its Python
        # code started since the last look, 50 ms ago; such a task takes about a second here).
        deadline, victim, seen = time.monotonic() + 150, None, None
        while victim is None:
            assert driver.poll() is None, report(f"the job ended (rc {driver.returncode}) before the kill")
            assert time.monotonic() < deadline, report("no chunk committed / no task started in time")
            if re.search(r"\[extract\] chunk 1/\d+ committed", driver_log.read_text()):
                running = [set(cluster.running_tasks(i, python=True)) for i in range(2)]
                if seen is not None:
                    victim = next((i for i in (1, 0) if running[i] - seen[i]), None)
                seen = running
            time.sleep(0.05)
        killed = cluster.kill_worker(victim)
        in_flight = set(cluster.running_tasks(victim, python=True).values())  # its log is final now
        killed_at = len(driver_log.read_text())
        commands = " ".join(killed.values())
        assert "deploy.worker.Worker" in commands and "CoarseGrainedExecutorBackend" in commands, killed
        assert "pyspark.daemon" in commands, killed  # the Python workers went too

        rc = driver.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(report("the job did not finish after the kill"))
    finally:
        if driver.poll() is None:
            kill_session(driver.pid)  # the driver and its JVM
            driver.wait()
    printed = driver_log.read_text()
    assert rc == 0, report(f"the job failed (rc {rc}) after the kill")
    after = printed[killed_at:]
    assert re.search(r"Lost executor \d+ on 127\.0\.0\.1", printed), report("no 'Lost executor' line")
    # The tasks running on the killed worker ran again, to the end, on the other one (no speculation: a
    # task of that stage and partition can only have finished there as a new attempt).
    assert in_flight and in_flight <= cluster.finished_tasks(1 - victim), report(f"tasks {in_flight} not rerun")
    assert "[extract] store complete" in after and "chunk 3/3 committed" in after

    manifest = read_manifest(out)
    ids = []
    for split in manifest["splits"]:
        if manifest["splits"][split]:
            data = read_split(out, split, manifest)
            assert len(data) == manifest["splits"][split]
            assert np.isfinite(data.features).all()
            ids += list(data.image_id)
    assert len(ids) == len(set(ids)) == N_IMAGES, "a row is missing or stored twice"
    assert set(ids) == set(picked)
    errors = read_errors(out).column("image_id").to_pylist()
    assert errors == [CORRUPT] and manifest["errors"] == 1

    # Every row holds its own image's features: those of the backbone run directly, in this process.
    rows = {}
    for split in manifest["splits"]:
        if manifest["splits"][split]:
            data = read_split(out, split, manifest)
            rows.update(zip(data.image_id, data.features))
    config = DataConfig.from_dict(manifest["data_config"])
    extractor = FeatureExtractor(BACKBONE, None, 0, precision="fp32", threads=1, data_config=config)
    for start in range(0, N_IMAGES, CHUNK):
        names = picked[start:start + CHUNK]
        direct = extractor(np.stack([config.load(str(root / "images" / n)) for n in names]))
        stored = np.stack([rows[n] for n in names])
        np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
    assert len(np.unique(np.stack(list(rows.values())), axis=0)) == N_IMAGES
