"""Run directories are safe output: recognized only by their marker, --overwrite deletes only the
project's own files, one job at a time, and bad or full disks are one line (common/runs/rundir.py,
heads.train; the fine-tune job's side is in tests/test_finetune.py)."""

import errno
import json
import os
import socket

import pytest

from common.runs import rundir
from common.runs.safe_output import LOCK, OutputLock
from heads import train
from tests.heads_fixtures import synthetic_store

FAST = ["--epochs", "2", "--batch-size", "64", "--threads", "1", "--quiet", "--bootstrap-draws", "0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("stores") / "s", {"train": 120, "val": 60, "test": 60}, dim=16,
                           signal=2.0, seed=4)


def train_cli(capsys, *argv) -> tuple[int, str]:
    """heads.train's exit status and its stderr, for a run expected to fail."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.cli(list(argv))
    return info.value.code, capsys.readouterr().err


def lookalike(folder):
    """What a run directory looks like, without the marker: someone else's results."""
    folder.mkdir(parents=True)
    for name, text in (("config.json", "{}"), ("metrics.json", "{}"), ("head.pt", "weights"), ("notes.txt", "mine")):
        (folder / name).write_text(text)
    return {p.name: p.read_text() for p in folder.iterdir()}


# --- common/runs/rundir.py -----------------------------------------------------------------------------


def test_prepare_makes_and_marks_a_new_run_directory(tmp_path):
    out = rundir.prepare(tmp_path / "a" / "run", overwrite=False, kind="finetune")
    marker = json.loads((out / rundir.MARKER).read_text())
    assert {k: marker[k] for k in ("format", "format_version", "kind")} == {
        "format": "cxr-features/run", "format_version": 1, "kind": "finetune"}
    assert marker["created"].endswith("+00:00") and sorted(p.name for p in out.iterdir()) == [rundir.MARKER]
    # A folder holding only our own lock is empty: the lock made it a moment ago.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK).write_text("{}")
    assert rundir.read_marker(rundir.prepare(tmp_path / "b", overwrite=False))["kind"] == "head"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_without_the_marker_is_refused_and_untouched(tmp_path, overwrite):
    before = lookalike(tmp_path / "results")
    with pytest.raises(rundir.RunError) as info:
        rundir.prepare(tmp_path / "results", overwrite)
    assert str(info.value) == (f"--out {tmp_path / 'results'}: exists and is not a run directory of this project "
                               "(no .cxr-run.json); refusing to write into it")
    assert {p.name: p.read_text() for p in (tmp_path / "results").iterdir()} == before


def test_a_marker_of_another_format_or_a_newer_version_is_not_ours(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / rundir.MARKER).write_text('{"format": "someone-else/run", "format_version": 1}')
    with pytest.raises(rundir.RunError, match="is not a run directory of this project"):
        rundir.prepare(tmp_path / "a", overwrite=True)
    out = rundir.prepare(tmp_path / "b", overwrite=False)
    rundir.write_json(out / rundir.MARKER, {**rundir.read_marker(out), "format_version": 2})
    with pytest.raises(rundir.RunError, match="format_version 2, which this cxr-features .version 1. does not know"):
        rundir.prepare(out, overwrite=True)
    assert (out / rundir.MARKER).exists()


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    out = rundir.prepare(tmp_path / "run", overwrite=False)
    own = ["config.json", "metrics.json", "head.pt", "report.md", "loss.png", "roc_val.png", "roc_test.png",
           "best.pt", "last.pt", ".config.json.tmp", "last.pt.tmp", ".cxr-run.json.tmp", "predictions/val.parquet",
           "predictions/test.parquet", "localization/00000001_000_Atelectasis.png", "overlays/worst_CHNCXR_0001_0.png"]
    mine = ["notes.txt", "roc_val.png.bak", "config.json.orig", "predictions/mine.csv", "test-probs.parquet",
            "extra/head.pt", "report.tmp"]
    for name in own + mine:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (out / LOCK).write_text("{}")  # the lock of the job that overwrites: never its own victim
    (tmp_path / "images").mkdir()
    (out / "data").symlink_to(tmp_path / "images", target_is_directory=True)
    logged = []
    with pytest.raises(rundir.RunError, match="a run is already here; pass --overwrite to replace it"):
        rundir.prepare(out, overwrite=False)
    rundir.prepare(out, overwrite=True, log=logged.append)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink())
    assert left == sorted([rundir.MARKER, LOCK, "data", *mine])
    assert not (out / "localization").exists() and (tmp_path / "run").is_dir()
    assert logged[0] == f"--overwrite: replacing the run in {out}"
    assert logged[1] == (f"--overwrite: kept 8 file(s) in {out} that this project did not write: "
                         "config.json.orig, data, extra, notes.txt, predictions/mine.csv, ...")


def test_overwrite_replaces_only_a_run_of_the_same_kind(tmp_path):
    out = rundir.prepare(tmp_path / "ft", overwrite=False, kind="finetune")
    for name in ("best.pt", "last.pt"):
        (out / name).write_text(name)
    for overwrite in (False, True):
        with pytest.raises(rundir.RunError) as info:
            rundir.prepare(out, overwrite, kind="head")
        assert str(info.value) == (f"--out {out}: holds a finetune run, and this command writes a head run; "
                                   "--overwrite replaces only a run of the same kind: choose another folder")
    assert (out / "best.pt").read_text() == "best.pt" and rundir.read_marker(out)["kind"] == "finetune"
    rundir.prepare(out, overwrite=True, kind="finetune", log=lambda m: None)
    assert not (out / "best.pt").exists()


@pytest.mark.parametrize("given", ["run", "run/head.pt", "run/predictions/test.parquet"])
def test_an_input_of_the_command_is_never_its_output(tmp_path, given):
    out = rundir.prepare(tmp_path / "run", overwrite=False, kind="evaluation")
    (out / "head.pt").write_text("weights")
    for overwrite in (False, True):
        with pytest.raises(rundir.RunError) as info:
            rundir.prepare(out, overwrite, kind="evaluation", inputs=["elsewhere", str(tmp_path / given)])
        assert str(info.value) == (f"--out {out}: is an input of this command ({tmp_path / given}); write the result "
                                   "to another folder")
    assert (out / "head.pt").read_text() == "weights"
    # A new folder inside an input's run is its own output, not the input.
    assert rundir.prepare(out / "sub", overwrite=False, kind="evaluation", inputs=[str(out)]).is_dir()


def test_heads_train_over_a_finetune_run_keeps_its_checkpoints(store, tmp_path, capsys):
    out = rundir.prepare(tmp_path / "ft", overwrite=False, kind="finetune")
    for name in ("best.pt", "last.pt", "metrics.json"):
        (out / name).write_text(name)
    code, err = train_cli(capsys, "--store", str(store), "--out", str(out), *FAST, "--overwrite")
    assert code == 2 and err == (f"heads.train: error: --out {out}: holds a finetune run, and this command writes a head run; "
                                 "--overwrite replaces only a run of the same kind: choose another folder\n")
    assert sorted(p.name for p in out.iterdir()) == [rundir.MARKER, "best.pt", "last.pt", "metrics.json"]


def test_evaluating_a_head_into_its_own_run_keeps_the_head(store, tmp_path, capsys):
    from heads import evaluate

    run = tmp_path / "run"
    train.main(["--store", str(store), "--out", str(run), *FAST])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for given in (run, run / "head.pt"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            evaluate.cli(["--run", str(given), "--out", str(run), "--overwrite", "--bootstrap-draws", "0"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert err.endswith(f"--out {run}: is an input of this command ({given}); write the result to another folder\n")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# --- heads.train ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_heads_train_refuses_a_folder_that_only_looks_like_a_run(store, tmp_path, capsys, overwrite):
    before = lookalike(tmp_path / "results")
    code, err = train_cli(capsys, "--store", str(store), "--out", str(tmp_path / "results"), *FAST, *overwrite)
    assert code == 2 and err == (f"heads.train: error: --out {tmp_path / 'results'}: exists and is not a run directory of "
                                 "this project (no .cxr-run.json); refusing to write into it\n")
    assert {p.name: p.read_text() for p in (tmp_path / "results").iterdir()} == before


def test_heads_train_overwrite_replaces_the_run_and_keeps_a_users_file(store, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--store", str(store), "--out", str(out), *FAST])
    (out / "notes.txt").write_text("mine")
    code, err = train_cli(capsys, "--store", str(store), "--out", str(out), *FAST)
    assert code == 2 and err.endswith("a run is already here; pass --overwrite to replace it\n")
    capsys.readouterr()
    train.main(["--store", str(store), "--out", str(out), *FAST, "--overwrite", "--init-seed", "3"])
    assert f"--overwrite: kept 1 file(s) in {out} that this project did not write: notes.txt" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["settings"]["init_seed"] == 3
    assert (out / "notes.txt").read_text() == "mine" and not (out / LOCK).exists()
    # Every file of a real head run is one the overwrite knows: nothing but the user's note is kept.
    logged = []
    rundir.clear(out, logged.append)
    assert sorted(p.name for p in out.iterdir()) == [rundir.MARKER, "notes.txt"] and len(logged) == 1


def test_heads_train_refuses_a_run_directory_another_job_writes(store, tmp_path, capsys):
    with OutputLock(tmp_path / "run"):
        code, err = train_cli(capsys, "--store", str(store), "--out", str(tmp_path / "run"), *FAST)
        assert (tmp_path / "run" / LOCK).exists()  # the refused job leaves the holder's lock alone
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"heads.train: error: {tmp_path / 'run'}: another job is writing here (host "
                          f"{socket.gethostname()}, pid {os.getpid()}, since ")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_heads_train_out_that_is_a_file_or_under_one_is_one_line(store, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = train_cli(capsys, "--store", str(store), "--out", str(tmp_path / "f"), *FAST)
    assert code == 2 and err == f"heads.train: error: --out {tmp_path / 'f'}: is a file, not a folder\n"
    code, err = train_cli(capsys, "--store", str(store), "--out", str(tmp_path / "f" / "run"), *FAST)
    assert code == 2 and err == (f"heads.train: error: --out {tmp_path / 'f' / 'run'}: is under {tmp_path / 'f'}, which is "
                                 "a file, not a folder\n")
    assert (tmp_path / "f").read_text() == "x"


def test_heads_train_full_disk_is_one_line_and_releases_the_lock(store, tmp_path, capsys, monkeypatch):
    write_json = rundir.write_json

    def full_at_config(path, obj):
        if path.name == rundir.CONFIG:  # after training: the run's first JSON, the marker, went through
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, obj)

    monkeypatch.setattr(rundir, "write_json", full_at_config)
    out = tmp_path / "run"
    code, err = train_cli(capsys, "--store", str(store), "--out", str(out), *FAST)
    assert code == 2 and err.splitlines()[-1] == f"heads.train: error: {out / 'config.json'}: no space left on device"
    assert "Traceback" not in err
    assert not (out / LOCK).exists()


def test_heads_train_read_only_folder_is_one_line(store, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:
        # chmod does not stop root: the file system says it instead, at the first write.
        def read_only(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(OutputLock, "acquire", lambda self: read_only(self.path))
    else:
        parent.chmod(0o500)
    try:
        code, err = train_cli(capsys, "--store", str(store), "--out", str(parent / "run"), *FAST)
    finally:
        parent.chmod(0o700)
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert code == 2 and err.count("\n") == 1 and err.startswith("heads.train: error: ") and err.endswith(f": {reason}\n")
    assert str(parent) in err


def test_a_run_refused_for_its_store_leaves_no_folder(tmp_path, capsys):
    import numpy as np

    from tests.heads_fixtures import synthetic_rows, write_store

    rng = np.random.default_rng(0)
    splits = {s: synthetic_rows(n, 8, 14, rng, prefix=s) for s, n in {"train": 40, "val": 20}.items()}
    splits["train"]["features"][3, 1] = np.nan
    bad = write_store(tmp_path / "nan", splits)
    code, err = train_cli(capsys, "--store", str(bad), "--out", str(tmp_path / "run"), *FAST)
    assert code == 2 and "1 rows have NaN or Inf features, first 'train_00003.png'" in err
    assert not (tmp_path / "run").exists()


def test_a_finetune_never_overwrites_the_run_holding_its_starting_checkpoint(tmp_path):
    from finetune.run import prepare_out

    out = rundir.prepare(tmp_path / "ft", overwrite=False, kind="finetune")
    (out / "best.pt").write_text("weights")
    with pytest.raises(rundir.RunError, match="is an input of this command"):
        prepare_out(str(out), True, {}, 2, inputs=[str(out / "best.pt")])
    assert (out / "best.pt").read_text() == "weights"


def test_report_re_renders_every_kind_of_run_it_knows(store, tmp_path, capsys):
    from heads import evaluate, report

    head = tmp_path / "head"
    train.main(["--store", str(store), "--out", str(head), *FAST])
    evaluate.main(["--run", str(head), "--out", str(tmp_path / "eval"), "--bootstrap-draws", "0"])
    for run in (head, tmp_path / "eval"):
        written = (run / rundir.REPORT).read_text()
        (run / rundir.REPORT).unlink()
        report.main(["--run", str(run)])
        assert (run / rundir.REPORT).read_text() == written
    lungs = rundir.prepare(tmp_path / "lungs", overwrite=False, kind="lungs")
    for run, line in ((lungs, "a lungs run, whose report its own command writes; cxr report re-renders head, finetune, "
                              "evaluation and ensemble runs"),
                      (store, "not found; is {store} a run directory?")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            report.cli(["--run", str(run)])
        assert info.value.code == 2 and capsys.readouterr().err.endswith(f": {line}\n".format(store=store))
