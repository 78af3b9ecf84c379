"""--dataset dicom and --dataset table end to end through the Spark job, on DICOM files written from real NIH PNGs.

Each DICOM holds one NIH image in another encoding (MONOCHROME1 inverted, RLE, JPEG 2000, a bare dataset
without the preamble), with the NIH row's patient, age and sex in its tags and personal tags beside them;
the labels come from a CSV keyed by SOPInstanceUID holding NIH's own findings column. The store must
hold exactly the contract's columns, the NIH labels of each image, and the features the backbone gives the
PNG itself.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.models.inference import FeatureExtractor
from common.data.labels import NIH_LABELS
from common.data.nih import read_nih
from common.features.store import read_errors, read_manifest
from jobs.extract import main
from tests.data_paths import NIH_CSV, NIH_IMAGES, needs_shared

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

pytestmark = needs_shared
# Random ResNet-50 features vary between images (random MobileNet's are near constant), so equality can fail.
BACKBONE, SIZE = "resnet50", 96
MODEL = ["--backbone", BACKBONE, "--input-size", str(SIZE), "--weights", "random:0", "--precision", "fp32"]
PERSONAL = {"PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "InstitutionName": "St Elsewhere",
            "AccessionNumber": "ACC123"}
CONTRACT = ["image_id", "patient_id", "view", "age", "sex", "labels", "features"]
ENCODINGS = ["MONOCHROME2", "MONOCHROME1", "RLE", "JPEG2000", "bare", "MONOCHROME2", "MONOCHROME1", "RLE"]


def _gray_pngs(n: int) -> list:
    out = []
    for path in sorted(NIH_IMAGES.glob("*.png")):
        with Image.open(path) as img:
            if img.mode == "L":
                out.append(path)
        if len(out) == n:
            return out
    pytest.skip(f"fewer than {n} 8-bit gray PNGs in {NIH_IMAGES}")


def _write(path, gray: np.ndarray, encoding: str, **tags) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.Modality = SecondaryCaptureImageStorage, "DX"
    if encoding == "MONOCHROME1":  # stored inverted: the decoder must invert it back
        ds.set_pixel_data(255 - gray, "MONOCHROME1", 8)
    else:
        ds.set_pixel_data(gray, "MONOCHROME2", 8)
    for name, value in {**PERSONAL, **tags}.items():
        setattr(ds, name, value)
    if encoding in ("RLE", "JPEG2000"):
        ds.compress(RLELossless if encoding == "RLE" else JPEG2000Lossless, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    if encoding == "bare":
        ds.file_meta = FileMetaDataset()
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """8 DICOMs of 8 NIH images (4 patients), a truncated one, a non-DICOM .dcm; labels by UID."""
    root = tmp_path_factory.mktemp("pacs")
    pngs = _gray_pngs(len(ENCODINGS) + 1)
    nih = read_nih(NIH_CSV).table.set_index("image_id")
    rows, uid_of = [], {}
    for i, (png, encoding) in enumerate(zip(pngs, ENCODINGS)):
        row = nih.loc[png.name]
        uid_of[png.name] = uid = generate_uid()
        with Image.open(png) as img:
            gray = np.asarray(img)
        _write(root / "export" / f"study{i // 2}" / f"IM{i:04d}.dcm", gray, encoding, PatientID=f"PAT{i // 2}",
               PatientSex="M" if row["sex"] == 1 else "F", PatientAge=f"{int(row['age']):03d}Y",
               ViewPosition=row["view"], SOPInstanceUID=uid)
        findings = [n for n, v in zip(NIH_LABELS, row["labels"]) if v == 1]
        rows.append({"SOPInstanceUID": uid, "Finding Labels": "|".join(findings) or "No Finding"})
    # A file cut short inside its pixel data: its header reads, its pixels do not (an error row).
    with Image.open(pngs[-1]) as img:
        _write(root / "export" / "bad" / "cut.dcm", np.asarray(img), "MONOCHROME2", PatientID="PAT9",
               SOPInstanceUID=(cut_uid := generate_uid()))
    data = (root / "export" / "bad" / "cut.dcm").read_bytes()
    (root / "export" / "bad" / "cut.dcm").write_bytes(data[: len(data) // 2])
    rows.append({"SOPInstanceUID": cut_uid, "Finding Labels": "No Finding"})
    (root / "export" / "bad" / "notes.dcm").write_text("not a DICOM file\n")
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return {"root": root, "pngs": pngs[:len(ENCODINGS)], "uid_of": uid_of, "cut_uid": cut_uid, "nih": nih}


@pytest.fixture(scope="module")
def store(archive, spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "pacs-mobilenet"
    root = archive["root"]
    summary = main(["--dataset", "dicom", "--images", str(root / "export"), "--label-table", str(root / "labels.csv"),
                    "--findings-column", "Finding Labels", "--label-names", ",".join(NIH_LABELS),
                    "--no-finding", "No Finding", "--split", "ratios", "--split-ratios", "0.5,0.25,0.25",
                    "--header-workers", "2", "--out", str(out), *MODEL, "--chunk-size", "4", "--images-per-task", "2"],
                   spark=spark)
    return out, summary


def _rows(out) -> pd.DataFrame:
    """Every split's rows, the store's own columns only (not the split partition)."""
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(out.glob("split=*/*.parquet"))],
                     ignore_index=True)


def test_dicom_store_keeps_the_contract_and_nothing_personal(store, archive):
    out, _ = store
    manifest = read_manifest(out)
    assert manifest["dataset"] == "dicom" and manifest["label_names"] == list(NIH_LABELS)
    table = _rows(out)
    assert sorted(table.columns) == sorted(CONTRACT)  # no other tag is copied
    text = table.drop(columns="features").astype(str).to_string()
    assert not any(v in text or v.split("^")[0] in text for v in PERSONAL.values())
    assert sorted(table["image_id"]) == sorted(archive["uid_of"].values())
    assert manifest["metadata_counts"]["not_dicom"] == 1 and manifest["errors"] == 1
    errors = read_errors(out).to_pylist()
    assert [e["image_id"] for e in errors] == [archive["cut_uid"]] and errors[0]["path"].endswith("cut.dcm")
    assert "\n" not in errors[0]["error"]


def test_dicom_rows_carry_their_tags_and_labels(store, archive):
    out, _ = store
    table = _rows(out).set_index("image_id")
    nih = archive["nih"]
    for png in archive["pngs"]:
        row, expected = table.loc[archive["uid_of"][png.name]], nih.loc[png.name]
        assert list(row["labels"]) == list(expected["labels"])
        assert row["age"] == expected["age"] and row["sex"] == expected["sex"] and row["view"] == expected["view"]
    assert table.groupby("patient_id").size().tolist() == [2, 2, 2, 2]


def test_dicom_features_equal_the_pngs_own(store, archive):
    """Every encoding (MONOCHROME1, RLE, JPEG 2000, bare) gives the PNG's features."""
    out, _ = store
    table = _rows(out).set_index("image_id")
    config = DataConfig(SIZE)
    extractor = FeatureExtractor(BACKBONE, None, 0, precision="fp32", threads=1, data_config=config)
    direct = extractor(np.stack([config.load(str(p)) for p in archive["pngs"]]))
    stored = np.stack([table.loc[archive["uid_of"][p.name], "features"] for p in archive["pngs"]])
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5)
    assert np.corrcoef(stored)[0, 1] < 0.999  # distinct images: the check above can fail


def test_table_kind_through_the_job(archive, spark, tmp_path):
    """A local table of PNG paths with one column per label, through the same job."""
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i, png in enumerate(archive["pngs"][:6]):
        shutil.copy(png, images / png.name)
        labels = archive["nih"].loc[png.name, "labels"]
        rows.append({"file": png.name, "pid": f"p{i // 2}", "Effusion": int(labels[NIH_LABELS.index("Effusion")]),
                     "Mass": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "local.csv", index=False)
    out = tmp_path / "store"
    main(["--dataset", "table", "--metadata", str(tmp_path / "local.csv"), "--images", str(images),
          "--path-column", "file", "--patient-column", "pid", "--label-columns", "Effusion,Mass",
          "--blank-label", "-1", "--split", "ratios", "--out", str(out), *MODEL, "--chunk-size", "8",
          "--images-per-task", "3"], spark=spark)
    manifest = read_manifest(out)
    assert manifest["dataset"] == "table" and manifest["label_names"] == ["Effusion", "Mass"]
    table = _rows(out)
    assert sorted(table.columns) == sorted(CONTRACT) and sorted(table["image_id"]) == sorted(r["file"] for r in rows)
    assert all(list(v)[1] == -1 for v in table["labels"])  # a blank cell under --blank-label -1
    assert json.loads((out / "manifest.json").read_text())["errors"] == 0
