"""From metadata file + images root to the table of images a job processes.

metadata reader -> canonical table -> images located -> split assigned -> sorted by image_id.
Every row dropped on the way is counted, and the counts go into the store's manifest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.locate import locate_images
from common.metadata import read_chexpert, read_nih
from common.splits import DEFAULT_RATIOS, check_no_leakage, official_splits, ratio_splits

# How each dataset's rows find their files (see common/locate.py).
LOCATE_BY = {"nih": "name", "chexpert": "relpath"}


@dataclass
class ImageTable:
    dataset: str
    label_names: tuple[str, ...]
    table: pd.DataFrame  # canonical columns + path + split, sorted by image_id
    counts: dict = field(default_factory=dict)
    split_method: dict = field(default_factory=dict)


def _official_lists(metadata: Path, train_val_list, test_list) -> tuple[Path, Path] | None:
    """The lists given by flag, else NIH's file names beside the metadata file, else None."""
    train_val = Path(train_val_list) if train_val_list else metadata.parent / "train_val_list.txt"
    test = Path(test_list) if test_list else metadata.parent / "test_list.txt"
    if train_val.is_file() and test.is_file():
        return train_val, test
    if train_val_list or test_list:
        missing = train_val if not train_val.is_file() else test
        raise FileNotFoundError(f"{missing}: split list not found")
    return None


def build_image_table(
    dataset: str,
    metadata: str | Path,
    images: str | Path,
    split: str = "auto",
    train_val_list: str | None = None,
    test_list: str | None = None,
    val_fraction: float = 0.1,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    seed: int = 0,
    keep_laterals: bool = False,
    limit: int | None = None,
    log=lambda msg: print(msg, file=sys.stderr),
) -> ImageTable:
    metadata = Path(metadata)
    if dataset == "nih":
        meta = read_nih(metadata)
    elif dataset == "chexpert":
        meta = read_chexpert(metadata, frontal_only=not keep_laterals)
    else:
        raise ValueError(f"--dataset {dataset!r}: choose nih or chexpert")
    counts = dict(meta.counts)

    lists = _official_lists(metadata, train_val_list, test_list) if split in ("auto", "official") else None
    if split == "official" and lists is None:
        raise FileNotFoundError(f"--split official: no train_val_list.txt/test_list.txt beside {metadata}")
    if lists:
        assignment = official_splits(meta.table, lists[0], lists[1], val_fraction, seed)
        method = {"kind": "official", "train_val_list": str(lists[0]), "test_list": str(lists[1]),
                  "val_fraction": val_fraction, "seed": seed}
    else:
        assignment = ratio_splits(meta.table, ratios, seed)
        method = {"kind": "patient_ratios", "ratios": list(ratios), "seed": seed}
    check_no_leakage(meta.table, assignment)
    table = meta.table.assign(split=assignment)
    counts["unlisted"] = int(table["split"].isna().sum())
    table = table[table["split"].notna()]

    located = locate_images(table, images, LOCATE_BY[dataset])
    counts["images_missing"] = located.missing
    if located.missing:
        log(f"{located.missing} of {len(table)} metadata rows have no image under {images} "
            f"(e.g. {', '.join(located.missing_examples[:3])}); they are skipped")
    table = located.table.sort_values("image_id", kind="stable").reset_index(drop=True)
    if limit is not None:
        table = table.head(limit)
    counts["images"] = len(table)
    return ImageTable(meta.dataset, meta.label_names, table, counts, method)
