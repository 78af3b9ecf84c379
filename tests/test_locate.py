import pandas as pd

from common.data.locate import locate_images


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_nih_names_found_in_kaggle_style_nested_folders_and_missing_counted(tmp_path):
    a = touch(tmp_path / "images_001" / "images" / "00000001_000.png")
    b = touch(tmp_path / "images_012" / "images" / "00030805_000.png")
    touch(tmp_path / "images_001" / "notes.txt")
    table = pd.DataFrame({"image_id": ["00000001_000.png", "00000002_000.png", "00030805_000.png"]})
    found = locate_images(table, tmp_path, by="name")
    assert found.table["path"].tolist() == [str(a), str(b)]
    assert found.missing == 1 and found.missing_examples == ["00000002_000.png"]


def test_chexpert_paths_match_with_or_without_the_release_folder(tmp_path):
    rel = "train/patient00001/study1/view1_frontal.jpg"
    image = touch(tmp_path / "CheXpert-v1.0-small" / rel)
    other = touch(tmp_path / "CheXpert-v1.0-small" / "train/patient00002/study1/view1_frontal.jpg")
    table = pd.DataFrame({"image_id": [f"CheXpert-v1.0-small/{rel}", "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"]})
    # The root may be the folder above the release or the release folder itself.
    for root in (tmp_path, tmp_path / "CheXpert-v1.0-small"):
        found = locate_images(table, root, by="relpath")
        assert found.table["path"].tolist() == [str(image), str(other)] and found.missing == 0
    # Matching by name alone would pair both rows with one view1_frontal.jpg.
    assert found.table["path"].nunique() == 2


def test_symlink_loops_are_walked_once_and_fifos_are_not_images(tmp_path):
    import os

    real = touch(tmp_path / "a" / "b" / "00000001_000.png")
    os.symlink(".", tmp_path / "loop")  # two links back up the tree: an endless walk without a visited set
    os.symlink("..", tmp_path / "a" / "up")
    os.mkfifo(tmp_path / "a" / "00000002_000.png")  # opening it would block the task forever
    os.symlink(tmp_path / "gone.png", tmp_path / "00000003_000.png")  # dangling
    linked = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    touch(linked / "00000004_000.png")
    os.symlink(linked, tmp_path / "shared")  # the shared layouts link image folders in: followed
    table = pd.DataFrame({"image_id": [f"0000000{i}_000.png" for i in range(1, 5)]})
    found = locate_images(table, tmp_path, by="name")
    assert found.table["image_id"].tolist() == ["00000001_000.png", "00000004_000.png"]
    assert found.table["path"].iloc[0] == str(real) and found.missing == 2
