"""The dataset registry: every entry complete, NIH and CheXpert read through it as before, parsers light."""

import argparse
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from common.data.chexpert import read_chexpert
from common.config import ConfigError
from common.data.datasets import DATASETS, Dataset, get_dataset
from common.data.image_table import LOCATE_BY
from common.data.labels import CHEXPERT_LABELS
from common.data.nih import read_nih
from common.data.table_flags import DATASET_FLAGS, add_table_flags, check_table_flags
from tests.data_paths import NIH_CSV, REPO, needs_shared

OPTIONS = {"frontal_only", "mapping", "label_table", "workers", "log"}  # what build_image_table passes


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_entry_is_complete_and_its_reader_resolves(name):
    entry = DATASETS[name]
    assert entry.name == name
    for f in fields(Dataset):
        value = getattr(entry, f.name)
        if f.name != "label_names":
            assert value is not None and value != "" or f.name == "options", f"{name}: {f.name} is empty"
    assert entry.reads in ("metadata", "images") and entry.locate_by in ("name", "relpath", "found")
    assert set(entry.options) <= OPTIONS
    module, function = entry.reader.split(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function))
    assert entry.label_names is None or len(entry.label_names) == len(set(entry.label_names)) > 0


def test_flags_and_locate_rules_come_from_the_registry():
    p = argparse.ArgumentParser()
    add_table_flags(p)
    dataset = next(a for a in p._actions if a.dest == "dataset")
    assert dataset.choices == list(DATASETS) and {"nih", "chexpert", "table", "dicom"} <= set(DATASETS)
    assert LOCATE_BY == {"nih": "name", "chexpert": "relpath", "table": "relpath", "dicom": "found"}
    with pytest.raises(ValueError, match="--dataset 'mimic': choose nih, chexpert, table, dicom"):
        get_dataset("mimic")


def _flags(*argv):
    p = argparse.ArgumentParser()
    add_table_flags(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, error", [
    (["--dataset", "nih", "--images", "i"], "--metadata is required"),
    (["--dataset", "dicom", "--metadata", "m.csv"], "--images is required"),
    (["--dataset", "nih", "--metadata", "m.csv", "--images", "i", "--path-column", "file"],
     "--path-column: not read by --dataset nih (only by table)"),
    (["--dataset", "table", "--metadata", "m.csv", "--images", "i", "--label-table", "l.csv"],
     "--label-table: not read by --dataset table (only by dicom)"),
    (["--dataset", "dicom", "--images", "i", "--keep-laterals"], "--keep-laterals: not read by --dataset dicom"),
    (["--dataset", "chexpert", "--metadata", "m.csv", "--images", "i", "--blank-label", "-1"],
     "--blank-label: not read by --dataset chexpert (only by table and dicom)"),
    (["--dataset", "dicom", "--images", "i", "--header-workers", "0"], "--header-workers 0: must be at least 1"),
])
def test_a_flag_the_dataset_does_not_read_is_refused_not_ignored(argv, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        check_table_flags(_flags(*argv))


def test_each_dataset_accepts_its_own_flags():
    check_table_flags(_flags("--dataset", "dicom", "--images", "i", "--label-table", "l.csv", "--label-key", "k",
                             "--findings-column", "f", "--header-workers", "2"))
    check_table_flags(_flags("--dataset", "table", "--metadata", "m", "--images", "i", "--table-mapping", "t.toml"))
    check_table_flags(_flags("--dataset", "chexpert", "--metadata", "m", "--images", "i", "--keep-laterals"))
    parser = argparse.ArgumentParser()
    add_table_flags(parser)
    known = {a.option_strings[0][2:] for a in parser._actions if a.option_strings}
    assert {f for names in DATASET_FLAGS.values() for f in names} <= known  # no stale flag name


def test_the_parser_imports_neither_pandas_nor_pydicom():
    code = ("import argparse, sys; from common.data.table_flags import add_table_flags; "
            "add_table_flags(argparse.ArgumentParser()); "
            "print(sorted(m for m in ('pandas', 'pydicom', 'common.data.tables') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@needs_shared
def test_nih_through_the_registry_is_read_nih():
    via = get_dataset("nih").read(NIH_CSV, frontal_only=True, mapping=None)
    direct = read_nih(NIH_CSV)
    assert via.dataset == "nih" and via.label_names == direct.label_names == get_dataset("nih").label_names
    pd.testing.assert_frame_equal(via.table.drop(columns="labels"), direct.table.drop(columns="labels"))
    assert np.array_equal(np.stack(via.table["labels"]), np.stack(direct.table["labels"]))
    assert via.counts == direct.counts


def test_chexpert_through_the_registry_is_read_chexpert(tmp_path):
    csv = tmp_path / "train.csv"
    rows = [",".join(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])]
    for i, (side, value) in enumerate([("Frontal", "1.0"), ("Lateral", "-1.0"), ("Frontal", "")]):
        rows.append(f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1.jpg,Male,{40 + i},{side},AP,"
                    + ",".join([value] * len(CHEXPERT_LABELS)))
    csv.write_text("\n".join(rows) + "\n")
    for keep in (False, True):
        via = get_dataset("chexpert").read(csv, frontal_only=not keep)
        direct = read_chexpert(csv, frontal_only=not keep)
        pd.testing.assert_frame_equal(via.table.drop(columns="labels"), direct.table.drop(columns="labels"))
        assert np.array_equal(np.stack(via.table["labels"]), np.stack(direct.table["labels"]))
        assert via.counts == direct.counts and via.label_names == CHEXPERT_LABELS
    assert np.stack(direct.table["labels"])[:, 0].tolist() == [1, -1, 0]  # blank = 0, as before
