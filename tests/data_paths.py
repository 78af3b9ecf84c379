"""Where the shared real data lives (../shared/data beside the checkout, as in CI)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NIH = SHARED / "nih"
NIH_CSV = NIH / "Data_Entry_2017_v2020.csv"
NIH_IMAGES = NIH / "images"
CHEXPERT_CSV = SHARED / "chexpert" / "train.csv"
SAMPLE = REPO / "sample" / "nih"
LUNGS = SHARED / "lungs" / "shenzhen"  # images/ and masks/, 566 pairs (see its README.md)

needs_shared = pytest.mark.skipif(not NIH_CSV.is_file(), reason=f"shared data not found at {SHARED}")
needs_lungs = pytest.mark.skipif(not (LUNGS / "masks").is_dir(), reason=f"lung masks not found at {LUNGS}")


def write_nih_subset(root: Path, names, corrupt: str | None = None, csv_name: str = "Data_Entry_2017_v2020.csv",
                     lists: bool = False) -> Path:
    """NIH metadata of `names` at root/csv_name, plus a row for `corrupt` (the first row's values under a patient of
    its own); with `lists`, the official split lists restricted to `names` (`corrupt` in train_val). Images are the
    caller's to copy."""
    keep = set(names)
    lines = NIH_CSV.read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[0] in keep]
    if corrupt:
        rows.append(corrupt + "," + rows[0].split(",", 1)[1].replace(",1,", ",99999,", 1))
    (root / csv_name).write_text("\n".join([lines[0], *rows]) + "\n")
    for name in ("train_val_list.txt", "test_list.txt") if lists else ():
        listed = [i for i in (NIH / name).read_text().split() if i in keep]
        (root / name).write_text("\n".join(listed + ([corrupt] if corrupt and name == "train_val_list.txt" else [])))
    return root / csv_name
