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
