"""--dataset table: any labelled image table (CSV or Parquet), columns named by flags or a TOML mapping."""

import argparse
import shutil

import numpy as np
import pandas as pd
import pytest

from common.config import parse_with_config
from common.data.image_table import build_image_table, table_from_flags
from common.data.labels import NIH_LABELS
from common.data.nih import read_nih
from common.data.table_flags import add_table_flags
from common.data.table_kind import read_table
from common.data.tables import MetadataError, TableMapping
from tests.data_paths import NIH_CSV, NIH_IMAGES, needs_shared

QUIET = {"log": lambda m: None}
FINDINGS = TableMapping(path="file", patient="patient", image_id="id", view="view", age="age", sex="sex",
                        findings="findings", label_names=NIH_LABELS, no_finding="No Finding")


@pytest.fixture(scope="module")
def nih():
    return read_nih(NIH_CSV).table.set_index("image_id")


@pytest.fixture
def collection(tmp_path, nih):
    """24 real NIH PNGs in two folders and their rows as a local collection would write them."""
    names = sorted(p.name for p in NIH_IMAGES.glob("*.png"))[:24]
    raw = pd.read_csv(NIH_CSV, dtype=str, keep_default_na=False, index_col=False).set_index("Image Index")
    rows = []
    for i, name in enumerate(names):
        rel = f"site{i % 2}/{name}"
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(NIH_IMAGES / name, tmp_path / "images" / rel)
        r = raw.loc[name]
        rows.append({"id": name, "file": rel, "patient": f"P{r['Patient ID']}", "view": r["View Position"].lower(),
                     "age": r["Patient Age"], "sex": {"M": "male", "F": "Female"}[r["Patient Gender"]],
                     "findings": r["Finding Labels"].replace("|", " | ")})
    return tmp_path, pd.DataFrame(rows)


def flags(*argv, config_section=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_table_flags(p)
    return parse_with_config(p, list(argv), config_section or "extract")


@needs_shared
def test_findings_column_from_csv_gives_nih_labels_and_a_patient_level_split(collection, nih):
    root, rows = collection
    rows.to_csv(root / "table.csv", index=False)
    images = build_image_table("table", root / "table.csv", root / "images", split="ratios", mapping=FINDINGS,
                               ratios=(0.5, 0.25, 0.25), **QUIET)
    t = images.table
    assert images.dataset == "table" and images.label_names == NIH_LABELS
    assert list(t.columns) == ["image_id", "patient_id", "view", "age", "sex", "labels", "split", "path"]
    assert sorted(t["image_id"]) == sorted(rows["id"]) and images.counts["images_missing"] == 0
    expected = nih.loc[t["image_id"]]
    assert np.array_equal(np.stack(t["labels"]), np.stack(expected["labels"]))
    assert t["sex"].tolist() == expected["sex"].tolist() and t["age"].tolist() == expected["age"].tolist()
    assert set(t["view"]) <= {"PA", "AP"} and all(p.endswith(i) for p, i in zip(t["path"], t["image_id"]))
    assert t.groupby("patient_id")["split"].nunique().max() == 1 and set(t["split"]) == {"train", "val", "test"}


@needs_shared
def test_label_columns_from_parquet_with_absolute_and_relative_paths(collection, tmp_path):
    root, rows = collection
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(root / "images" / rows["file"][0], elsewhere / "moved.png")
    rows.loc[0, "file"] = str(elsewhere / "moved.png")  # absolute, outside --images
    rows.loc[1, "file"] = str(root / "images" / rows["file"][1])  # absolute, inside
    rows["Mass"] = ["1", "", "-1", "0"] * 6
    rows["Effusion"] = [1.0, 0.0, None, -1.0] * 6  # Parquet keeps numbers and nulls
    rows.drop(columns=["id", "findings"]).to_parquet(root / "table.parquet")
    for blank in (0, -1):
        mapping = TableMapping(path="file", patient="patient", label_columns=("Mass", "Effusion"), blank_label=blank)
        images = build_image_table("table", root / "table.parquet", root / "images", mapping=mapping, **QUIET)
        t = images.table.set_index("image_id").loc[rows["file"]]  # image id defaults to the path
        assert images.label_names == ("Mass", "Effusion") and images.counts["images_missing"] == 0
        assert np.stack(t["labels"])[:4].tolist() == [[1, 1], [blank, 0], [-1, blank], [0, -1]]
        assert t["path"].iloc[0] == str(elsewhere / "moved.png") and t["age"].isna().all() and t["sex"].isna().all()


@needs_shared
def test_a_toml_mapping_and_a_config_file_set_the_columns_and_flags_override(collection, tmp_path):
    root, rows = collection
    rows.to_csv(root / "table.csv", index=False)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[table]\npath-column = "file"\npatient_column = "patient"\nimage-id-column = "id"\n'
                       f'findings-column = "findings"\nlabel-names = {list(NIH_LABELS)!r}\n'
                       'no-finding = "No Finding"\nsex-column = "nope"\n'.replace("'", '"'))
    base = ["--dataset", "table", "--metadata", str(root / "table.csv"), "--images", str(root / "images")]
    with pytest.raises(MetadataError, match=r"table\.csv: missing column\(s\) 'nope'"):
        table_from_flags(flags(*base, "--table-mapping", str(mapping)), **QUIET)
    images = table_from_flags(flags(*base, "--table-mapping", str(mapping), "--sex-column", "sex"), **QUIET)
    assert images.table["sex"].notna().all() and images.label_names == NIH_LABELS

    config = tmp_path / "extract.toml"
    config.write_text(f'[extract]\ndataset = "table"\nmetadata = "{root / "table.csv"}"\nimages = "{root / "images"}"\n'
                      'path-column = "file"\npatient-column = "patient"\nlabel-columns = ["age"]\n'
                      'findings-separator = ";"\n')
    args = flags("--config", str(config))
    assert args.label_columns == "age" and args.findings_separator == ";"
    with pytest.raises(MetadataError, match=r"row 2: age = '\d+', expected 1, 0, -1 or blank"):
        table_from_flags(args, **QUIET)

    mapping.write_text('[table]\npath-column = "file"\ncolour = "red"\n')
    with pytest.raises(ValueError, match=r"mapping\.toml \[table\] colour: unknown key"):
        table_from_flags(flags(*base, "--table-mapping", str(mapping)), **QUIET)


def _csv(tmp_path, text):
    path = tmp_path / "t.csv"
    path.write_text(text)
    return path


def test_refusals_name_the_file_row_and_column(tmp_path):
    mapping = TableMapping(path="file", patient="patient", findings="findings", label_names=("A", "B"))
    path = _csv(tmp_path, "file,patient,findings\na.png,1,A\nb.png,2,A|C\n")
    with pytest.raises(MetadataError, match=rf"^{path}: row 3: unknown finding 'C' in 'findings' \(not in --label-names\)$"):
        read_table(path, mapping)
    with pytest.raises(MetadataError, match=rf"^{path}: missing column\(s\) 'A', 'B'$"):
        read_table(path, TableMapping(path="file", patient="patient", label_columns=("A", "B")))
    path = _csv(tmp_path, "file,patient,A\na.png,1,yes\n")
    with pytest.raises(MetadataError, match=rf"^{path}: row 2: A = 'yes', expected 1, 0, -1 or blank$"):
        read_table(path, TableMapping(path="file", patient="patient", label_columns=("A",)))
    path = _csv(tmp_path, "file,patient,A\na.png,1,1\nb.png,,0\n")
    with pytest.raises(MetadataError, match=r"row 3: patient is blank \(splits are patient-level\)"):
        read_table(path, TableMapping(path="file", patient="patient", label_columns=("A",)))
    for bad, message in [(TableMapping(path="file", patient="patient"), "name the labels with --label-columns"),
                         (TableMapping(path="file", label_columns=("A",)), "--patient-column: the table kind needs"),
                         (TableMapping(patient="patient", label_columns=("A",)), "--path-column: the table kind needs"),
                         (TableMapping(path="file", patient="patient", findings="A"), "needs --label-names")]:
        with pytest.raises(MetadataError, match=message):
            read_table(path, bad)


def test_findings_no_finding_blank_cells_and_sex_spellings(tmp_path):
    path = _csv(tmp_path, "file,patient,findings,sex\n"
                          "a.png,1,No Finding,M\nb.png,1,B|A,woman\nc.png,2,,Unknown\nd.png,3,B,f\n")
    for blank in (0, -1):
        mapping = TableMapping(path="file", patient="patient", findings="findings", label_names=("A", "B"),
                               no_finding="No Finding", sex="sex", blank_label=blank)
        meta = read_table(path, mapping)
        assert np.stack(meta.table["labels"]).tolist() == [[0, 0], [1, 1], [blank, blank], [0, 1]]
        assert meta.table["sex"].tolist() == [1, 0, pd.NA, 0] and meta.label_names == ("A", "B")


def test_a_semicolon_or_tab_separated_table_gets_a_separator_hint(tmp_path):
    mapping = TableMapping(path="file", patient="patient", label_columns=("A",))
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        path = _csv(tmp_path, f"file{sep}patient{sep}A\na.png{sep}1{sep}1\n")
        with pytest.raises(MetadataError) as info:
            read_table(path, mapping)
        assert str(info.value) == (f"{path}: missing column(s) 'file', 'patient', 'A'; the header reads as one column, "
                                   f"separated by {name} rather than commas: save the table as comma-separated CSV "
                                   "(or as Parquet)")


def test_dot_slash_in_table_paths_is_the_same_file_and_id(tmp_path):
    (tmp_path / "images" / "site").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "images" / "site" / name).write_bytes(b"x")
    mapping = TableMapping(path="file", patient="patient", label_columns=("A",))
    path = _csv(tmp_path, "file,patient,A\n./site/a.png,1,1\nsite//b.png,2,0\nsite/./c.png,3,0\n")
    images = build_image_table("table", path, tmp_path / "images", mapping=mapping, **QUIET)
    assert sorted(images.table["image_id"]) == ["site/a.png", "site/b.png", "site/c.png"]
    assert images.counts["images_missing"] == 0
    path = _csv(tmp_path, "file,patient,A\n./site/a.png,1,1\nsite/a.png,2,0\n")
    with pytest.raises(MetadataError, match="site/a.png"):  # one file named twice is one id twice
        read_table(path, mapping)
