import numpy as np
import pandas as pd
import pytest

from common.data.chexpert import read_chexpert
from common.data.labels import CHEXPERT_LABELS, NIH_LABELS
from common.data.nih import read_nih
from common.data.tables import MetadataError
from tests.data_paths import CHEXPERT_CSV, NIH_CSV, needs_shared



@pytest.fixture(scope="module")
def nih():
    return read_nih(NIH_CSV)


@needs_shared
def test_nih_2020_file_reads_every_row_with_labels_in_fixed_order(nih):
    table = nih.table
    assert len(table) == 112_120
    assert nih.label_names == NIH_LABELS
    labels = np.stack(table["labels"])
    assert labels.shape == (112_120, 14)
    # Published ChestX-ray14 counts: Infiltration 19,894, Hernia 227, No Finding 60,361.
    assert labels[:, NIH_LABELS.index("Infiltration")].sum() == 19_894
    assert labels[:, NIH_LABELS.index("Hernia")].sum() == 227
    assert (labels.sum(axis=1) == 0).sum() == 60_361
    first = table.iloc[1]  # 00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA
    assert first["image_id"] == "00000001_001.png" and first["patient_id"] == "00000001"
    assert first["age"] == 58 and first["sex"] == 1 and first["view"] == "PA"
    assert [NIH_LABELS[i] for i in np.flatnonzero(first["labels"])] == ["Cardiomegaly", "Emphysema"]
    assert nih.counts == {"rows_read": 112_120, "age_dropped": 0}


@needs_shared
def test_nih_2017_variant_with_trailing_column_and_implausible_ages(tmp_path, nih):
    lines = NIH_CSV.read_text().splitlines()
    # The 2017 release: a trailing empty column on every line, and ages such as 148-414.
    bad_rows = {5: "148", 100: "414", 2000: "155"}
    out = [lines[0] + ","]
    for i, line in enumerate(lines[1:]):
        fields = line.split(",")
        if i in bad_rows:
            fields[4] = bad_rows[i]
        out.append(",".join(fields) + ",")
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("\n".join(out) + "\n")

    old = read_nih(path)
    assert old.counts["age_dropped"] == 3
    assert old.table["age"].iloc[list(bad_rows)].isna().all()
    keep = ~old.table.index.isin(list(bad_rows))
    pd.testing.assert_series_equal(old.table["age"][keep], nih.table["age"][keep])
    assert old.table["image_id"].equals(nih.table["image_id"])
    assert np.array_equal(np.stack(old.table["labels"]), np.stack(nih.table["labels"]))


@needs_shared
def test_nih_unknown_finding_names_the_row(tmp_path):
    lines = NIH_CSV.read_text().splitlines()[:6]
    fields = lines[3].split(",")
    fields[1] = "Cardiomegaly|Efusion"
    lines[3] = ",".join(fields)
    path = tmp_path / "meta.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(MetadataError, match=r"meta\.csv: row 4: unknown finding 'Efusion'"):
        read_nih(path)


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("Image Index,Finding Labels\nx.png,No Finding\n")
    with pytest.raises(MetadataError, match=r"meta\.csv: missing column\(s\) 'Patient ID'"):
        read_nih(path)


@pytest.fixture(scope="module")
def chexpert_raw():
    return pd.read_csv(CHEXPERT_CSV)


@needs_shared
def test_chexpert_keeps_uncertain_raw_blank_is_zero_frontal_only(chexpert_raw):
    meta = read_chexpert(CHEXPERT_CSV)
    frontal = chexpert_raw[chexpert_raw["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    assert len(meta.table) == len(frontal) == 191_027
    assert meta.counts["laterals_dropped"] == 32_387
    labels = np.stack(meta.table["labels"])
    raw = frontal[list(CHEXPERT_LABELS)].to_numpy()
    assert np.array_equal(labels == -1, raw == -1)  # uncertain kept as -1, not mapped
    assert np.array_equal(labels == 1, raw == 1)
    assert np.array_equal(labels == 0, (raw == 0) | np.isnan(raw))  # blank = not mentioned = 0
    row = meta.table.iloc[1]  # patient00002 study2: Female, 87, Frontal, AP, Cardiomegaly -1
    assert row["patient_id"] == "patient00002" and row["view"] == "AP"
    assert row["sex"] == 0 and row["age"] == 87
    assert row["labels"][CHEXPERT_LABELS.index("Cardiomegaly")] == -1
    assert meta.table["sex"].isna().sum() == (frontal["Sex"] == "Unknown").sum()


@needs_shared
def test_chexpert_keep_laterals(chexpert_raw):
    meta = read_chexpert(CHEXPERT_CSV, frontal_only=False)
    assert len(meta.table) == 223_414
    assert (meta.table["view"] == "LATERAL").sum() == 32_387


@needs_shared
def test_chexpert_bad_label_value_names_row_and_column(tmp_path):
    lines = CHEXPERT_CSV.read_text().splitlines()[:4]
    fields = lines[2].split(",")
    fields[5 + CHEXPERT_LABELS.index("Edema")] = "2.0"
    lines[2] = ",".join(fields)
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(MetadataError, match=r"row 3: Edema = '2.0'"):
        read_chexpert(path)


@needs_shared
def test_chexpert_age_zero_is_unknown_and_counted(chexpert_raw):
    meta = read_chexpert(CHEXPERT_CSV, frontal_only=False)
    zeros = int((chexpert_raw["Age"] == 0).sum())
    assert zeros > 0  # the real table has them
    assert not (meta.table["age"] == 0).any()
    assert meta.table["age"].isna().sum() == zeros and meta.counts["age_dropped"] == zeros


NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"
NIH_ROW = "00000001_00{}.png,No Finding,0,1,57,M,PA"
CHEXPERT_HEADER = ",".join(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])
CHEXPERT_ROW = "CheXpert-v1.0-small/train/patient00001/study{}/view1_frontal.jpg,Female,68,Frontal,AP" + "," * 14
READERS = [(read_nih, NIH_HEADER, NIH_ROW), (read_chexpert, CHEXPERT_HEADER, CHEXPERT_ROW)]


def _refused(reader, path, message):
    with pytest.raises(MetadataError) as err:
        reader(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("reader, header, row", READERS, ids=["nih", "chexpert"])
def test_empty_blank_and_header_only_files_are_one_line_errors(tmp_path, reader, header, row):
    path = tmp_path / "meta.csv"
    path.write_bytes(b"")
    _refused(reader, path, "empty file (0 bytes)")
    path.write_bytes(b"\n\n")
    _refused(reader, path, "no header line, only blank lines")
    path.write_text(header + "\n\n")
    _refused(reader, path, "no rows below the header")


@pytest.mark.parametrize("reader, header, row", READERS, ids=["nih", "chexpert"])
def test_a_non_utf8_file_names_its_first_bad_line(tmp_path, reader, header, row):
    path = tmp_path / "meta.csv"
    latin1 = row.format("2ü").encode("latin-1")  # ü is one byte in Latin-1, 0xfc, and two in UTF-8
    path.write_bytes(b"\n".join([header.encode(), row.format(1).encode(), latin1, row.format(3).encode()]))
    column = latin1.index(b"\xfc") + 1
    _refused(reader, path,
             f"line 3: not UTF-8 (byte 0xfc at column {column}, e.g. Latin-1 text); save the file as UTF-8")
    path.write_bytes(path.read_bytes().replace(b"\xfc", "ü".encode()))  # the same text in UTF-8 reads
    assert len(reader(path).table) == 3


def test_a_file_pandas_cannot_tokenize_is_one_line(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("\n".join([NIH_HEADER, NIH_ROW.format(1), '"' + NIH_ROW.format(2)]))  # unclosed quote
    with pytest.raises(MetadataError, match=r"^\S*meta\.csv: not a readable CSV: .*EOF inside string[^\n]*$"):
        read_nih(path)
