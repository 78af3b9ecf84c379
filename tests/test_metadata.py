import numpy as np
import pandas as pd
import pytest

from common.labels import CHEXPERT_LABELS, NIH_LABELS
from common.metadata import MetadataError, read_chexpert, read_nih
from tests.data_paths import CHEXPERT_CSV, NIH_CSV, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def nih():
    return read_nih(NIH_CSV)


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


def test_chexpert_keep_laterals(chexpert_raw):
    meta = read_chexpert(CHEXPERT_CSV, frontal_only=False)
    assert len(meta.table) == 223_414
    assert (meta.table["view"] == "LATERAL").sum() == 32_387


def test_chexpert_bad_label_value_names_row_and_column(tmp_path):
    lines = CHEXPERT_CSV.read_text().splitlines()[:4]
    fields = lines[2].split(",")
    fields[5 + CHEXPERT_LABELS.index("Edema")] = "2.0"
    lines[2] = ",".join(fields)
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(MetadataError, match=r"row 3: Edema = '2.0'"):
        read_chexpert(path)


def test_chexpert_age_zero_is_unknown_and_counted(chexpert_raw):
    meta = read_chexpert(CHEXPERT_CSV, frontal_only=False)
    zeros = int((chexpert_raw["Age"] == 0).sum())
    assert zeros > 0  # the real table has them
    assert not (meta.table["age"] == 0).any()
    assert meta.table["age"].isna().sum() == zeros and meta.counts["age_dropped"] == zeros
