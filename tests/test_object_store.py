"""Images in a bucket -> store in a bucket, on a real S3 server on loopback (moto's standalone server).

The job runs as users run it (a driver process with the AWS_* environment, local[2]); it is killed after
two chunks are committed, a killed attempt's stray file is planted among the committed ones, and the
rerun must finish with every image exactly once and features equal to a local run's.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from common import fs
from common.features.store import StoreError, read_errors, read_manifest, read_split
from jobs.extract import main
from tests.data_paths import REPO, SAMPLE

CORRUPT = "00099999_000.png"
MODEL = ["--backbone", "resnet50", "--weights", "random:0", "--input-size", "64", "--precision", "fp32",
         "--val-fraction", "0.2", "--chunk-size", "8", "--images-per-task", "3", "--progress-interval", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(log_path) -> tuple[subprocess.Popen, int]:
    """moto's standalone S3 server on a free loopback port, once it answers."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)


def _s3_env(port: int) -> dict:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 and the environment that points pyarrow (and the job) at it."""
    server, port = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    env = _s3_env(port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs._filesystem.cache_clear()
    admin = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                              access_key="testing", secret_key="testing", region="us-east-1")
    for bucket in ("archive", "stores"):
        admin.create_dir(bucket)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    fs._filesystem.cache_clear()
    server.terminate()
    server.wait()


@pytest.fixture(scope="module")
def archive(s3):
    """The bundled 40-image sample uploaded under a nested prefix, plus one truncated PNG."""
    names = sorted(p.name for p in (SAMPLE / "images").glob("*.png"))
    for i, name in enumerate(names):
        fs.write_bytes(f"s3://archive/nih/images_{i % 2 + 1:03d}/{name}", (SAMPLE / "images" / name).read_bytes())
    fs.write_bytes(f"s3://archive/nih/images_001/{CORRUPT}", (SAMPLE / "images" / names[0]).read_bytes()[:4000])
    return names


def broken_in_sample() -> list[str]:
    """The sample's own unreadable images (it carries one on purpose), as the decoder tells them locally."""
    from common.images.data_config import DataConfig

    broken = []
    for path in sorted((SAMPLE / "images").glob("*.png")):
        try:
            DataConfig(64).load(str(path))
        except OSError:
            broken.append(path.name)
    return broken


def job_flags(metadata, images: str, out: str) -> list[str]:
    return ["--dataset", "nih", "--metadata", str(metadata), "--images", images, "--out", out, *MODEL]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, archive):
    """The sample's metadata with a row for the truncated file; the sample's official split lists beside it."""
    root = tmp_path_factory.mktemp("meta")
    lines = (SAMPLE / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    lines.append(f"{CORRUPT},No Finding,0,99999,50,M,PA,2048,2048,0.143,0.143")  # a patient of its own
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    for name in ("train_val_list.txt", "test_list.txt"):
        extra = [CORRUPT] if name == "train_val_list.txt" else []
        (root / name).write_text("\n".join([*(SAMPLE / name).read_text().split(), *extra]) + "\n")
    return root / "Data_Entry_2017_v2020.csv"


def _run_driver(flags, env, log_path, until=None):
    """The job as a driver process; with `until`, killed (driver, JVM, workers) once until() holds."""
    full_env = {**os.environ, **env, "PYSPARK_SUBMIT_ARGS": "--master local[2] pyspark-shell",
                "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "extract.py"), *flags], env=full_env,
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None:
            if until is not None and until():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None
            assert time.monotonic() < deadline, open(log_path).read()[-3000:]
            time.sleep(0.1)
    assert until is None and proc.returncode == 0, open(log_path).read()[-3000:]
    return proc.returncode


@pytest.mark.s3
def test_bucket_to_bucket_killed_and_restarted_gives_every_row_once(s3, archive, metadata, spark, tmp_path):
    out = "s3://stores/nih-resnet50"
    flags = job_flags(metadata, "s3://archive/nih", out)
    marker = f"{out}/_work/chunk-00001.json"
    _run_driver(flags, s3, tmp_path / "first.log", until=lambda: fs.exists(marker))
    first = (tmp_path / "first.log").read_text()
    assert "chunk 2/6 committed" in first or fs.exists(marker), first[-2000:]
    with pytest.raises(StoreError, match="no manifest.json"):
        read_manifest(out)  # a killed run never looks complete
    committed = [json.loads(fs.read_bytes(f"{out}/_work/chunk-{i:05d}.json")) for i in range(2)]

    # A killed attempt's file beside the committed ones (same rows: a reader of unlisted files doubles them).
    listed = committed[0]["files"][0]
    stray = f"{out}/{listed['file'].rsplit('/', 1)[0]}/{listed['kind']}-00000-killedattempt.parquet"
    fs.write_bytes(stray, fs.read_bytes(f"{out}/{listed['file']}"))

    _run_driver(flags, s3, tmp_path / "second.log")
    second = (tmp_path / "second.log").read_text()
    assert "2 of 6 chunks (16 images) already committed; skipping them" in second, second[-2000:]
    manifest = read_manifest(out)
    unreadable = sorted([CORRUPT, *broken_in_sample()])
    assert sorted(read_errors(out).column("image_id").to_pylist()) == unreadable
    assert manifest["errors"] == len(unreadable)
    ids = [i for s in manifest["splits"] if manifest["splits"][s] for i in read_split(out, s, manifest).image_id]
    # Every image once: no duplicate from the stray file or a retried task, none lost.
    assert sorted(ids) == sorted(set(archive) - set(unreadable)) and len(ids) == sum(manifest["splits"].values())
    # The store holds exactly its listed files: _work and the stray are gone.
    objects = {uri.removeprefix(out + "/") for uri, _ in fs.list_files(out)}
    assert objects == {"manifest.json", *(f for files in manifest["files"].values() for f in files)}
    assert all(f["file"].startswith("_work/") for c in committed for f in c["files"])

    # The same features as a local run of the same images (copied from the bucket by the test).
    local_images = tmp_path / "images"
    for uri, _ in fs.list_files("s3://archive/nih"):
        target = local_images / uri.removeprefix("s3://archive/nih/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.read_bytes(uri))
    main(job_flags(metadata, str(local_images), str(tmp_path / "local")), spark=spark)
    for split in ("train", "val", "test"):
        if manifest["splits"][split]:
            remote, local = read_split(out, split, manifest), read_split(tmp_path / "local", split)
            assert list(remote.image_id) == list(local.image_id)
            # fp32, but batches differ between runs (oneDNN picks kernels per batch size): not bit-equal.
            np.testing.assert_allclose(remote.features, local.features, rtol=2e-3, atol=1e-5)


@pytest.mark.s3
def test_second_writer_on_a_bucket_store_is_refused(s3, archive, metadata, spark, tmp_path):
    from common.runs.safe_output import RemoteLock

    out = "s3://stores/locked"
    with RemoteLock(out):
        with pytest.raises(Exception, match="another job is writing here"):
            main(job_flags(metadata, "s3://archive/nih", out), spark=spark)
    assert not fs.exists(f"{out}/manifest.json") and not fs.exists(f"{out}/.cxr.lock")


def test_reading_a_store_ignores_files_the_manifest_does_not_list(tmp_path):
    """A store on any file system is its listed files: an extra file in a split folder is not read."""
    from tests.heads_fixtures import split_table, write_store

    rows = {"image_id": ["a", "b"], "patient_id": ["1", "2"], "view": ["PA", "AP"], "age": [50.0, 60.0],
            "sex": [1, 0], "labels": [[0] * 14, [1] * 14], "features": np.eye(2, 4, dtype=np.float32)}
    store = write_store(tmp_path / "s", {"train": rows}, files_per_split=1)
    manifest = read_manifest(store)
    assert len(read_split(store, "train", manifest)) == 2  # no list: every file of the folder (older stores)
    pq.write_table(split_table(rows), store / "split=train" / "stray.parquet")
    assert len(read_split(store, "train", manifest)) == 4
    listed = {**manifest, "files": {"train": [f"split=train/{p.name}" for p in (store / "split=train").glob("part-*")]}}
    assert len(read_split(store, "train", listed)) == 2


def test_heads_train_on_a_store_behind_a_uri(tmp_path):
    """A store copied to an fsspec file system (memory://, the fallback for schemes pyarrow lacks) trains a head
    from its URI, with the same result as from the local copy."""
    from heads import train
    from tests.heads_fixtures import write_store

    rng = np.random.default_rng(0)

    def rows(n, first):
        return {"image_id": [f"i{first + i}" for i in range(n)], "patient_id": [f"p{first + i}" for i in range(n)],
                "view": ["PA"] * n, "age": [50.0] * n, "sex": [1] * n,
                "labels": rng.integers(0, 2, (n, 14)).tolist(), "features": rng.normal(size=(n, 8)).astype(np.float32)}

    local = write_store(tmp_path / "s", {"train": rows(40, 0), "val": rows(20, 100), "test": rows(20, 200)})
    uri = f"memory://stores/{tmp_path.name}"
    for path in local.rglob("*"):
        if path.is_file():
            fs.write_bytes(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())
    head = ["--head", "linear", "--epochs", "2", "--quiet", "--bootstrap-draws", "0", "--threads", "1"]
    remote_run = train.main(["--store", uri, "--out", str(tmp_path / "remote"), *head])
    local_run = train.main(["--store", str(local), "--out", str(tmp_path / "local"), *head])
    assert remote_run["val_mean_auc"] == local_run["val_mean_auc"]
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["stores"][0]["path"] == uri


def test_a_remote_lock_taken_by_another_job_is_noticed_and_stale_ones_are_taken_over():
    from common.runs.safe_output import OutputLockedError, RemoteLock

    folder = "memory://locks/store"
    first = RemoteLock(folder, heartbeat_seconds=0.05, log=lambda m: None)
    with first:
        with pytest.raises(OutputLockedError, match="another job is writing here"):
            RemoteLock(folder).acquire()
        # A job that passed the check in the same instant wrote the lock after this one: this one finds out.
        fs.write_bytes(f"{folder}/.cxr.lock", json.dumps({"host": "other", "pid": 1, "token": "x",
                                                          "beat": time.time()}).encode())
        deadline = time.monotonic() + 10
        while not first.lost:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert fs.exists(f"{folder}/.cxr.lock")  # the other job's lock is not this one's to delete
    # That job's heartbeat stopped long ago (its machine died): the lock is stale and taken over.
    fs.write_bytes(f"{folder}/.cxr.lock", json.dumps({"host": "other", "pid": 1, "token": "x", "beat": 0}).encode())
    with RemoteLock(folder, log=lambda m: None) as taker:
        assert json.loads(fs.read_bytes(f"{folder}/.cxr.lock"))["token"] == taker.record["token"]
    assert not fs.exists(f"{folder}/.cxr.lock")


@pytest.mark.s3
def test_a_store_that_stops_answering_mid_run_is_one_line_naming_what_is_kept(tmp_path):
    """The S3 endpoint of the output goes away after the first chunk: one line naming the store, the committed
    chunks and how to go on; no Python or Java traceback."""
    server, port = _start_moto(tmp_path / "moto.log")
    try:
        env = _s3_env(port)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                          access_key="testing", secret_key="testing", region="us-east-1").create_dir("gone")
        marker = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                                   secret_key="testing", region="us-east-1")
        flags = ["--config", "conf/sample.toml", "--out", "s3://gone/x", *MODEL]
        full_env = {**os.environ, **env, "PYSPARK_SUBMIT_ARGS": "--master local[2] pyspark-shell",
                    "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable}
        with open(tmp_path / "job.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "extract.py"), *flags], env=full_env,
                                    cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while marker.get_file_info("gone/x/_work/chunk-00000.json").type == pafs.FileType.NotFound:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
                time.sleep(0.2)
            server.kill()
            server.wait()
            try:
                proc.wait(timeout=300)  # a bound against a hang: the job stops by itself
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    printed = (tmp_path / "job.log").read_text()
    assert proc.returncode == 2, printed[-3000:]
    assert "Traceback" not in printed and "Exception" not in printed, printed[-3000:]
    last = printed.strip().splitlines()[-1]
    assert last.startswith("jobs/extract.py: error: --out s3://gone/x: "), last
    assert re.search(r"; [1-5] of 5 chunks are committed and kept: run the same command again to resume$", last), last
