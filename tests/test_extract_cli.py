"""Bad input to the extraction job: one line naming the culprit, exit 2, nothing written lost."""

import sys

import pytest

from jobs.extract import cli
from tests.data_paths import SAMPLE


def run_cli(monkeypatch, capsys, *flags):
    monkeypatch.setattr(sys, "argv", ["jobs/extract.py", *flags])
    with pytest.raises(SystemExit) as exit_:
        cli()
    err = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, err[-1] if err else ""


def sample_flags(out, *extra):
    return ["--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"), "--images", str(SAMPLE / "images"),
            "--out", str(out), "--backbone", "resnet50", *extra]


@pytest.fixture
def complete_store(tmp_path):
    store = tmp_path / "store"
    (store / "split=train").mkdir(parents=True)
    (store / "split=train" / "part-0.parquet").write_bytes(b"precious")
    (store / "manifest.json").write_text('{"format_version": 1}')
    return store


def test_missing_metadata_file_names_it(monkeypatch, capsys, tmp_path):
    code, line = run_cli(monkeypatch, capsys, "--metadata", str(tmp_path / "nope.csv"), "--images", str(tmp_path),
                         "--out", str(tmp_path / "s"), "--weights", "random")
    assert code == 2 and line == f"jobs/extract.py: error: {tmp_path / 'nope.csv'}: metadata file not found"


def test_unknown_backbone_lists_the_choices(monkeypatch, capsys, tmp_path):
    code, line = run_cli(monkeypatch, capsys, *sample_flags(tmp_path / "s", "--backbone", "resnet51"))
    assert code == 2 and "unknown backbone 'resnet51'" in line and "densenet121" in line


def test_uncached_imagenet_weights_say_which_file_goes_where_and_keep_the_store(monkeypatch, capsys, tmp_path,
                                                                                   complete_store):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, line = run_cli(monkeypatch, capsys, *sample_flags(complete_store, "--weights", "imagenet", "--overwrite"))
    assert code == 2
    assert "resnet50-11ad3fa6.pth" in line and str(tmp_path / "torch" / "hub" / "checkpoints") in line
    assert (complete_store / "split=train" / "part-0.parquet").read_bytes() == b"precious"
    assert (complete_store / "manifest.json").exists()


def test_complete_store_needs_overwrite(monkeypatch, capsys, complete_store):
    code, line = run_cli(monkeypatch, capsys, *sample_flags(complete_store, "--weights", "random"))
    assert code == 2 and line.endswith("a complete feature store is already here; pass --overwrite to replace it")
    assert (complete_store / "split=train" / "part-0.parquet").read_bytes() == b"precious"


def test_directory_that_is_not_a_store_is_never_written_into(monkeypatch, capsys, tmp_path):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("years of work")
    code, line = run_cli(monkeypatch, capsys, *sample_flags(other, "--weights", "random", "--overwrite"))
    assert code == 2 and "exists and is not a feature store" in line
    assert (other / "chapter1.tex").read_text() == "years of work"


def test_missing_required_flag(monkeypatch, capsys):
    code, line = run_cli(monkeypatch, capsys, "--weights", "random")
    assert code == 2 and line == "jobs/extract.py: error: --metadata is required (or set it in --config)"


def test_unparsable_split_ratios_name_the_flag(monkeypatch, capsys, tmp_path):
    code, line = run_cli(monkeypatch, capsys, *sample_flags(tmp_path / "s", "--weights", "random", "--split", "ratios",
                                                            "--split-ratios", "0.7;0.1;0.2"))
    assert code == 2 and line == "jobs/extract.py: error: --split-ratios '0.7;0.1;0.2': expected three comma-separated numbers"


def test_a_folder_with_split_subfolders_is_not_taken_for_a_store(monkeypatch, capsys, tmp_path):
    # Folder names prove nothing: only the manifest or an unfinished run's plan make a store.
    lookalike = tmp_path / "results"
    (lookalike / "split=train").mkdir(parents=True)
    (lookalike / "split=train" / "mine.csv").write_text("keep me")
    code, line = run_cli(monkeypatch, capsys, *sample_flags(lookalike, "--weights", "random", "--overwrite"))
    assert code == 2 and "is not a feature store of this project" in line and "even with --overwrite" in line
    assert (lookalike / "split=train" / "mine.csv").read_text() == "keep me"


def test_out_that_is_a_file_or_under_one_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    code, line = run_cli(monkeypatch, capsys, *sample_flags(tmp_path / "f" / "store", "--weights", "random"))
    assert code == 2 and line.endswith(f"--out {tmp_path / 'f' / 'store'}: is under {tmp_path / 'f'}, which is a file, not a folder")


def test_a_store_another_job_writes_is_refused_naming_it(monkeypatch, capsys, tmp_path):
    import os
    import socket

    from common.runs.safe_output import OutputLock

    with OutputLock(tmp_path / "s"):
        code, line = run_cli(monkeypatch, capsys, *sample_flags(tmp_path / "s", "--weights", "random"))
    assert code == 2 and f"another job is writing here (host {socket.gethostname()}, pid {os.getpid()}" in line
    assert not (tmp_path / "s" / ".cxr.lock").exists()  # released by its holder


@pytest.mark.slow
def test_full_disk_is_one_line_keeps_chunks_and_overwrite_keeps_foreign_files(monkeypatch, capsys, tmp_path, spark):
    import errno

    import common.features.store_writer

    store = tmp_path / "store"
    flags = sample_flags(store, "--weights", "random", "--backbone", "mobilenet_v3_large", "--limit", "12",
                         "--chunk-size", "6")
    run_cli_ok = lambda *extra: (monkeypatch.setattr(sys, "argv", ["jobs/extract.py", *flags, *extra]), cli())
    run_cli_ok()
    (store / "notes.txt").write_text("mine")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device", str(store / "manifest.json"))

    monkeypatch.setattr(common.features.store_writer, "write_manifest", full)
    code, line = run_cli(monkeypatch, capsys, *flags, "--overwrite")
    assert code == 2 and line == f"jobs/extract.py: error: {store / 'manifest.json'}: no space left on device"
    assert sorted(p.name for p in (store / "_work").glob("chunk-?????.json")) == ["chunk-00000.json", "chunk-00001.json"]
    assert not (store / "manifest.json").exists() and (store / "notes.txt").read_text() == "mine"
    monkeypatch.undo()
    run_cli_ok()  # the same command resumes from the kept chunks
    assert (store / "manifest.json").exists() and (store / "notes.txt").read_text() == "mine"
    assert not (store / "_work").exists() and not (store / ".cxr.lock").exists()


class _Counter:
    value = 0


class _Clock:
    """A clock the test moves by hand: the watchdog is checked at chosen instants, never by sleeping."""
    now = 100.0

    def __call__(self):
        return self.now


def test_the_watchdog_stops_a_job_where_no_image_finishes(capsys):
    from jobs.extract import Progress

    clock, stopped = _Clock(), []
    p = Progress(10, 0, _Counter(), _Counter(), interval=60, stall_seconds=0.2, on_stall=lambda: stopped.append(1),
                 clock=clock)
    for clock.now in (100.1, 100.19):
        p.check()
    assert not p.stalled and stopped == []
    clock.now = 100.2
    p.check()
    assert p.stalled and stopped == [1]
    clock.now = 100.6
    p.check()
    assert stopped == [1]  # called once, not at every tick
    assert "no image finished for 0.2 s (--stall-timeout)" in capsys.readouterr().err

    moving = _Counter()
    p = Progress(10, 0, moving, _Counter(), interval=60, stall_seconds=0.3, on_stall=lambda: stopped.append(2),
                 clock=clock)
    for _ in range(8):  # an image every 0.25 s: never 0.3 s without one
        moving.value += 1
        clock.now += 0.25
        p.check()
    assert not p.stalled
    clock.now += 0.29
    p.check()
    assert not p.stalled
    clock.now += 0.01  # 0.3 s since the last image
    p.check()
    assert p.stalled and stopped == [1, 2]


def test_the_progress_line_is_printed_every_interval(capsys):
    from jobs.extract import Progress

    clock, done = _Clock(), _Counter()
    p = Progress(100, 20, done, _Counter(), interval=10, clock=clock)
    done.value = 40
    clock.now += 9.9
    p.check()
    assert capsys.readouterr().err == ""
    clock.now += 0.1
    p.check()
    assert "60/100 images (60.0%), 4.0 images/s, 0 errors, ETA 0:00:10" in capsys.readouterr().err


def test_the_watchdog_thread_checks_until_the_job_ends():
    import threading

    from jobs.extract import Progress

    checked = threading.Event()
    p = Progress(10, 0, _Counter(), _Counter(), interval=0.01)
    p.check = checked.set
    with p:
        assert checked.wait(30)  # a bound against a hang, not a measurement
    p._thread.join(30)
    assert not p._thread.is_alive()
