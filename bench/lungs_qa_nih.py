"""How the shipped lung model fares on another hospital's films: QA flags over the NIH images.

    .venv/bin/python bench/lungs_qa_nih.py [--images DIR] [--metadata CSV] [--backbone-size 224]

NIH ChestX-ray14 has no lung masks, so Dice cannot be measured there; what can be counted is how
many masks look wrong by the store's own QA rule (lungs.masking.qa_flags), and which films they
are (view position, age), as masked extraction would flag them. Prints the counts, the lung
fraction's spread, and each flagged film.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.images.data_config import DataConfig  # noqa: E402
from common.features.extraction import input_loader, transform_batch  # noqa: E402
from lungs.masking import QA_OK, LungMasker  # noqa: E402

NIH = REPO.parent / "shared" / "data" / "nih"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=str(NIH / "images"))
    p.add_argument("--metadata", default=str(NIH / "Data_Entry_2017_v2020.csv"))
    p.add_argument("--backbone-size", type=int, default=224, help="the backbone input the mask is predicted on")
    args = p.parse_args()
    paths = sorted(Path(args.images).glob("*.png"))
    if not paths:
        sys.exit(f"no PNGs under {args.images}")
    meta = pd.read_csv(args.metadata).set_index("Image Index")
    masker = LungMasker("default")
    load = input_loader(DataConfig(args.backbone_size), masker)  # as masked extraction decodes
    fractions, flags = [], []
    for i in range(0, len(paths), 32):
        batch = paths[i:i + 32]
        _, columns = transform_batch(masker, [load(str(q)) for q in batch], [q.name for q in batch])
        fractions += columns["lung_fraction"]
        flags += columns["lung_qa"]
    ids = [q.name for q in paths]
    view = meta["View Position"].reindex(ids).fillna("?").to_numpy()
    counts = pd.Series(flags).value_counts().to_dict()
    flagged = [k for k, f in enumerate(flags) if f != QA_OK]
    fr = np.array(fractions)
    print(f"{len(ids)} NIH films ({(view == 'AP').mean():.0%} AP): QA {counts}")
    print(f"lung fraction: median {np.median(fr):.3f}, 5th-95th percentile {np.percentile(fr, 5):.3f}-{np.percentile(fr, 95):.3f}")
    print(f"flagged: {len(flagged)}, of them AP {sum(view[k] == 'AP' for k in flagged)}")
    for k in flagged:
        row = meta.loc[ids[k]] if ids[k] in meta.index else {}
        print(f"  {ids[k]}: {flags[k]}, fraction {fr[k]:.3f}, {row.get('View Position', '?')}, "
              f"age {row.get('Patient Age', '?')}, {row.get('Finding Labels', '?')}")


if __name__ == "__main__":
    main()
