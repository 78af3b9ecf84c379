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
