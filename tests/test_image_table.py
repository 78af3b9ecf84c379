"""The image table with a separate test table: CheXpert's protocol (train.csv -> train/val, valid.csv -> test)."""

import numpy as np
import pytest
from PIL import Image

from common.data.image_table import build_image_table
from common.data.labels import CHEXPERT_LABELS
from tests.data_paths import CHEXPERT_CSV

HEADER = CHEXPERT_CSV.read_text().splitlines()[0] if CHEXPERT_CSV.is_file() else None
needs_chexpert = pytest.mark.skipif(HEADER is None, reason="shared CheXpert train.csv not found")


def _archive(root, split: str, patients: range, per_patient: int = 2):
    """A CheXpert-style table and its JPEGs: one study per patient, `per_patient` frontal images."""
    rows = []
    rng = np.random.default_rng(len(patients))
    n_labels = len(HEADER.split(",")) - 5
    for p in patients:
        for v in range(per_patient):
            rel = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study1/view{v + 1}_frontal.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 32), dtype=np.uint8)).save(root / rel)
            labels = ",".join(rng.choice(["1.0", "0.0", "-1.0", ""], n_labels))
            rows.append(f"{rel},Female,{50 + p % 30},Frontal,AP,{labels}")
    csv = root / f"{split}.csv"
    csv.write_text("\n".join([HEADER, *rows]) + "\n")
    return csv


@needs_chexpert
def test_test_table_is_the_test_split_and_train_val_are_split_by_patient(tmp_path):
    train_root, valid_root = tmp_path / "train_root", tmp_path / "valid_root"
    train_csv = _archive(train_root, "train", range(1, 21))
    valid_csv = _archive(valid_root, "valid", range(64541, 64546))
    images = build_image_table("chexpert", train_csv, train_root, val_fraction=0.2, seed=3,
                               test_metadata=valid_csv, test_images=valid_root, log=lambda m: None)
    t = images.table
    test = t[t["split"] == "test"]
    assert set(test["image_id"].str.split("/").str[1]) == {"valid"} and len(test) == 10
    assert set(t.loc[t["split"] != "test", "image_id"].str.split("/").str[1]) == {"train"}
    # 20 train patients: 4 to val, 16 to train, no patient in two splits.
    per_split = t.groupby("split")["patient_id"].nunique().to_dict()
    assert per_split == {"train": 16, "val": 4, "test": 5}
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    assert images.split_method["kind"] == "test_table" and images.counts["images_missing"] == 0
    assert all(p.startswith(str(valid_root)) for p in test["path"])


@needs_chexpert
def test_a_test_table_patient_is_not_trained_on_and_shared_ids_are_refused(tmp_path):
    root = tmp_path / "root"
    train_csv = _archive(root, "train", range(1, 11))
    valid_csv = _archive(root, "valid", range(9, 13))  # patients 9 and 10 are in both
    images = build_image_table("chexpert", train_csv, root, test_metadata=valid_csv, log=lambda m: None)
    t = images.table
    assert images.counts["test_patients_dropped_from_train"] == 2
    assert set(t.loc[t["patient_id"].isin(["patient00009", "patient00010"]), "split"]) == {"test"}

    with pytest.raises(ValueError, match=r"--test-metadata .*train\.csv.*image ids also in --metadata"):
        build_image_table("chexpert", train_csv, root, test_metadata=train_csv, log=lambda m: None)
    with pytest.raises(ValueError, match="leave out --split official"):
        build_image_table("chexpert", train_csv, root, split="official", test_metadata=valid_csv)


# Hand-made tables (no shared data): what a job is told when no image is left to process.
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def _nih(tmp_path, names, files=()):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("\n".join([NIH_HEADER, *(f"{n},No Finding,0,{i + 1},50,M,PA" for i, n in enumerate(names))]))
    images = tmp_path / "images"
    images.mkdir()
    for name in files:
        (images / name).write_bytes(b"x")
    return csv, images


def _no_image_left(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        build_image_table(*args, log=lambda m: None, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_no_image_under_images_names_the_folder_and_what_was_looked_for(tmp_path):
    csv, images = _nih(tmp_path, ["00000001_000.png", "00000002_000.png"], files=["other.png"])
    assert _no_image_left("nih", csv, images, split="ratios") == (
        f"--images {images}: none of the 2 metadata rows has an image there "
        "(looked by file name anywhere below it for e.g. 00000001_000.png, 00000002_000.png)")


def test_split_lists_that_name_none_of_the_rows_are_named(tmp_path):
    csv, images = _nih(tmp_path, ["00000001_000.png"], files=["00000001_000.png"])
    (tmp_path / "train_val_list.txt").write_text("00000009_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000008_000.png\n")
    assert _no_image_left("nih", csv, images) == (
        f"{tmp_path / 'train_val_list.txt'}, {tmp_path / 'test_list.txt'}: the split lists name none of the 1 "
        f"images of --metadata {csv} (e.g. 00000001_000.png)")


def test_a_table_of_laterals_only_says_so(tmp_path):
    csv = tmp_path / "train.csv"
    rel = "CheXpert-v1.0-small/train/patient00001/study1/view1_lateral.jpg"
    csv.write_text("\n".join([",".join(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]),
                               f"{rel},Male,40,Lateral," + "," * len(CHEXPERT_LABELS)]))
    assert _no_image_left("chexpert", csv, tmp_path) == (
        f"--metadata {csv}: 0 rows (1 of 1 are lateral views; --keep-laterals keeps them)")


def test_a_test_table_without_images_names_both_folders(tmp_path):
    csv, images = _nih(tmp_path, ["00000001_000.png"])
    test_csv = tmp_path / "test.csv"
    test_csv.write_text(f"{NIH_HEADER}\n00000005_000.png,No Finding,0,5,50,F,AP\n")
    message = _no_image_left("nih", csv, images, test_metadata=test_csv, test_images=tmp_path / "images")
    assert message.startswith(f"--images {images}: none of the 1 metadata rows") and \
        f"; --test-images {images}: none of the 1 metadata rows" in message


def test_limit_must_keep_an_image(tmp_path):
    csv, images = _nih(tmp_path, ["00000001_000.png"], files=["00000001_000.png"])
    assert _no_image_left("nih", csv, images, limit=0) == "--limit 0: must be at least 1"
    assert len(build_image_table("nih", csv, images, limit=1, log=lambda m: None).table) == 1
