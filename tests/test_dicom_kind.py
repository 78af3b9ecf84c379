"""--dataset dicom: the canonical table from the files' own headers, labels from a table keyed by UID or name."""

import numpy as np
import pandas as pd
import pytest

pydicom = pytest.importorskip("pydicom")

from common.data.dicom_kind import dicom_age_years, read_dicom  # noqa: E402
from common.data.image_table import build_image_table  # noqa: E402
from common.data.tables import MetadataError, TableMapping  # noqa: E402

PERSONAL = {"PatientName": "Doe^Jane", "InstitutionName": "St Elsewhere", "PatientBirthDate": "19700101"}


def write_dicom(path, **tags):
    """An uncompressed 8-bit MONOCHROME2 file with the given tags (None: tag left out) and personal ones."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = tags.get("SOPInstanceUID") or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    for tag, value in {**PERSONAL, **tags}.items():
        if value is not None:
            setattr(ds, tag, value)
    pixels = np.arange(16 * 12, dtype=np.uint8).reshape(16, 12)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "dicom"
    specs = [  # file, PatientID, sex, age, view, uid
        ("a/1.dcm", "P1", "M", "045Y", "PA", "1.2.3.1"),
        ("a/2.dcm", "P1", "M", "006M", "ap", "1.2.3.2"),
        ("b/3.dcm", "P2", "F", "010W", "AP", "1.2.3.3"),
        ("b/4.dcm", "P3", "O", "003D", None, None),  # no SOPInstanceUID: the path is its id
        ("c/5.dcm", "P4", None, "150Y", "LL", "1.2.3.5"),  # implausible age
        ("c/6.dcm", "P5", "F", None, "PA", "1.2.3.6"),  # no age
        ("c/7.DCM", "P6", "F", "45", "PA", "1.2.3.7"),  # malformed age
        ("d/8.dcm", None, "M", "030Y", "PA", "1.2.3.8"),  # no PatientID: skipped, counted
    ]
    for file, patient, sex, age, view, uid in specs:
        write_dicom(root / file, PatientID=patient, PatientSex=sex, PatientAge=age, ViewPosition=view,
                    SOPInstanceUID=uid)
    (root / "d" / "notes.dcm").write_text("not a DICOM file\n")
    (root / "d" / "readme.txt").write_text("passed over: no DICOM name, no marker\n")
    (root / "d" / "LICENSE").write_text("passed over too\n")
    # Exports name files by UID or number: these are DICOM by their marker. DICOMDIR is the export's index.
    write_dicom(root / "e" / "1.2.840.99.1.77", PatientID="P7", PatientSex="M", PatientAge="070Y", ViewPosition="PA",
                SOPInstanceUID="1.2.3.11")
    write_dicom(root / "e" / "IM000010", PatientID="P7", PatientSex="M", PatientAge="070Y", ViewPosition="AP",
                SOPInstanceUID="1.2.3.10")
    write_dicom(root / "DICOMDIR", PatientID="X")
    return root


def test_ages_in_years():
    assert dicom_age_years("045Y") == 45 and dicom_age_years("006M") == pytest.approx(0.5)
    assert dicom_age_years("010W") == pytest.approx(70 / 365.25) and dicom_age_years("003D") == pytest.approx(3 / 365.25)
    assert dicom_age_years("121Y") is None and dicom_age_years("") is None and dicom_age_years("45") is None


@pytest.mark.parametrize("workers", [1, 2])
def test_headers_become_the_canonical_table_and_bad_files_are_counted(archive, workers, monkeypatch):
    monkeypatch.setattr("common.data.dicom_kind.HEADER_CHUNK", 2)  # several chunks: the pool really runs
    lines = []
    meta = read_dicom(archive, workers=workers, log=lines.append)
    t = meta.table.set_index("image_id")
    assert meta.counts == {"rows_read": 11, "other_files": 2, "not_dicom": 1, "no_patient_id": 1, "age_missing": 1,
                           "age_dropped": 2, "uid_missing": 1, "duplicate_uid": 0}
    assert len(lines) == 1 and "2 of 11 DICOM files" in lines[0] and "d/notes.dcm (not DICOM" in lines[0]
    assert sorted(t.index) == ["1.2.3.1", "1.2.3.10", "1.2.3.11", "1.2.3.2", "1.2.3.3", "1.2.3.5", "1.2.3.6", "1.2.3.7",
                               "b/4.dcm"]
    assert t.loc["1.2.3.2", "view"] == "AP" and t.loc["b/4.dcm", "view"] is None
    assert t.loc["1.2.3.1", "age"] == 45 and t.loc["1.2.3.2", "age"] == pytest.approx(0.5)
    assert t[["age"]].loc[["1.2.3.5", "1.2.3.6", "1.2.3.7"]].isna().all().all()
    assert t.loc["1.2.3.3", "sex"] == 0 and t.loc["1.2.3.6", "sex"] == 0
    assert pd.isna(t.loc["b/4.dcm", "sex"]) and pd.isna(t.loc["1.2.3.5", "sex"]) and t.loc["1.2.3.1", "sex"] == 1
    assert t.loc["1.2.3.1", "patient_id"] == "P1" and meta.label_names == () and len(t.loc["1.2.3.1", "labels"]) == 0


def test_no_personal_tag_reaches_the_table(archive):
    images = build_image_table("dicom", None, archive, split="ratios", workers=1, log=lambda m: None)
    t = images.table
    assert sorted(t.columns) == sorted(["image_id", "patient_id", "view", "age", "sex", "labels", "split", "path"])
    text = t.drop(columns="path").astype(str).to_string()
    assert not any(value in text or value.split("^")[0] in text for value in PERSONAL.values())
    assert t.groupby("patient_id")["split"].nunique().max() == 1 and images.dataset == "dicom"


def test_labels_keyed_by_uid_or_file_name_in_either_layout(archive, tmp_path):
    by_uid = tmp_path / "labels.csv"
    by_uid.write_text("key,Mass,Effusion\n1.2.3.1,1,0\n1.2.3.2,,1\n3.dcm,-1,1\n4.dcm,0,0\n1.2.3.9,1,1\n")
    lines = []
    mapping = TableMapping(label_columns=("Mass", "Effusion"), label_key="key", blank_label=-1)
    meta = read_dicom(archive, mapping, by_uid, workers=1, log=lines.append)
    labels = dict(zip(meta.table["image_id"], map(list, meta.table["labels"])))
    assert labels == {"1.2.3.1": [1, 0], "1.2.3.2": [-1, 1], "1.2.3.3": [-1, 1], "b/4.dcm": [0, 0]}
    assert meta.label_names == ("Mass", "Effusion") and meta.counts["labels_missing"] == 5
    assert meta.counts["label_rows_unmatched"] == 1 and "5 of 9 DICOM files have no row" in lines[-1]

    findings = tmp_path / "findings.parquet"
    pd.DataFrame({"SOPInstanceUID": ["1.2.3.1", "c/5.dcm"], "f": ["Mass", "No Finding"]}).to_parquet(findings)
    mapping = TableMapping(findings="f", label_names=("Effusion", "Mass"), no_finding="No Finding")
    meta = read_dicom(archive, mapping, findings, workers=1, log=lambda m: None)
    assert dict(zip(meta.table["image_id"], map(list, meta.table["labels"]))) == {"1.2.3.1": [0, 1], "1.2.3.5": [0, 0]}

    findings = tmp_path / "bad.csv"
    findings.write_text("SOPInstanceUID,f\n1.2.3.1,Mass\n1.2.3.2,Nodule\n")
    with pytest.raises(MetadataError, match=r"bad\.csv: row 3: unknown finding 'Nodule'"):
        read_dicom(archive, mapping, findings, workers=1, log=lambda m: None)


def test_a_folder_without_dicom_files_is_refused(tmp_path):
    (tmp_path / "x.dcm").write_text("no")
    (tmp_path / "notes.txt").write_text("no")
    with pytest.raises(MetadataError, match=r"--images .*: no readable DICOM file with a PatientID below it "
                                            r"\(1 DICOM files, 1 other files\)"):
        read_dicom(tmp_path, workers=1, log=lambda m: None)
    with pytest.raises(ValueError, match="--test-metadata: not for --dataset dicom"):
        build_image_table("dicom", None, tmp_path, test_metadata=tmp_path / "x.csv", workers=1)
