"""The image table with a separate test table: CheXpert's protocol (train.csv -> train/val, valid.csv -> test)."""

import numpy as np
import pytest
from PIL import Image

from common.image_table import build_image_table
from tests.data_paths import CHEXPERT_CSV

HEADER = CHEXPERT_CSV.read_text().splitlines()[0] if CHEXPERT_CSV.is_file() else None
pytestmark = pytest.mark.skipif(HEADER is None, reason="shared CheXpert train.csv not found")


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
