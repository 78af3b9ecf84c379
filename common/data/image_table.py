"""From metadata file + images root to the table of images a job processes.

metadata reader -> canonical table -> images located -> split assigned -> sorted by image_id.
Every row dropped on the way is counted, and the counts go into the store's manifest.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from common import fs
from common.config import ConfigError, load_section, parse_list
from common.data.datasets import DATASETS, get_dataset
from common.data.locate import locate_images
from common.data.splits import DEFAULT_RATIOS, check_no_leakage, official_splits, ratio_splits
from common.data.table_flags import MAPPING_KEYS
from common.data.tables import TableMapping

# How each dataset's rows find their files (see common/data/locate.py).
LOCATE_BY = {name: d.locate_by for name, d in DATASETS.items()}


@dataclass
class ImageTable:
    dataset: str
    label_names: tuple[str, ...]
    table: pd.DataFrame  # canonical columns + path + split, sorted by image_id
    counts: dict = field(default_factory=dict)
    split_method: dict = field(default_factory=dict)


def _official_lists(metadata: Path | None, train_val_list, test_list) -> tuple[Path, Path] | None:
    """The lists given by flag, else NIH's file names beside the metadata file (if any), else None."""
    if metadata is None and not (train_val_list or test_list):
        return None
    beside = metadata.parent if metadata is not None else Path(".")
    train_val = Path(train_val_list) if train_val_list else beside / "train_val_list.txt"
    test = Path(test_list) if test_list else beside / "test_list.txt"
    if train_val.is_file() and test.is_file():
        return train_val, test
    if train_val_list or test_list:
        missing = train_val if not train_val.is_file() else test
        raise FileNotFoundError(f"{missing}: split list not found")
    return None


@dataclass
class _Steps:
    """What build_image_table's steps share: the dataset, the readers' options, the log, the counts of rows
    dropped, and why each step that left nothing did (for the error when no image remains)."""

    dataset: str
    options: dict
    log: Callable[[str], None]
    counts: dict = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)

    def read(self, metadata: Path | None, images, flag: str):
        dataset, entry = self.dataset, get_dataset(self.dataset)
        if entry.reads == "metadata" and metadata is None:
            raise ValueError(f"{flag}: required for --dataset {dataset} ({entry.metadata_help})")
        if entry.reads != "metadata" and metadata is not None:
            raise ValueError(f"{flag} {metadata}: not used by --dataset {dataset} ({entry.metadata_help}); "
                             "leave it out")
        if entry.reads == "images" and not fs.is_local(images):
            raise ValueError(f"--images {images}: --dataset {dataset} reads every file's header from a local or "
                             "mounted folder; mount or copy the export (images on object storage work with the "
                             "other datasets)")
        meta = entry.read(metadata if entry.reads == "metadata" else images, **self.options)
        if meta.table.empty:  # the readers refuse a file without rows; this is every row filtered out
            laterals = meta.counts.get("laterals_dropped", 0)
            why = (f" ({laterals} of {meta.counts['rows_read']} are lateral views; --keep-laterals keeps them)"
                   if laterals else "")
            self.empty.append(f"{flag} {metadata}: 0 rows{why}")
        return meta

    def located(self, table: pd.DataFrame, images, key: str, flag: str) -> pd.DataFrame:
        entry = get_dataset(self.dataset)
        located = locate_images(table, images, entry.locate_by, entry.locate_key)
        self.counts[key] = located.missing
        if located.missing:
            self.log(f"{located.missing} of {len(table)} metadata rows have no image under {images} "
                     f"(e.g. {', '.join(located.missing_examples[:3])}); they are skipped")
        if len(table) and located.table.empty:
            how = "by file name anywhere below it" if entry.locate_by == "name" else "by path relative to it"
            self.empty.append(f"{flag} {images}: none of the {len(table)} metadata rows has an image there (looked "
                              f"{how} for e.g. {', '.join(located.missing_examples[:3])})")
        return located.table.drop(columns=["file"], errors="ignore")  # the reader's own path: located, not stored


def _with_test_table(meta, test_meta, test_metadata: Path, val_fraction: float, seed: int, counts: dict):
    """Train/val from the main table by patient, test = the whole test table (e.g. CheXpert's valid.csv)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    clash = set(meta.table["image_id"]) & set(test_meta.table["image_id"])
    if clash:
        raise ValueError(f"--test-metadata {test_metadata}: {len(clash)} image ids also in --metadata, "
                         f"e.g. {sorted(clash)[0]}")
    # A patient of the test table must not be trained on: their train rows leave.
    shared = meta.table["patient_id"].isin(set(test_meta.table["patient_id"]))
    counts["test_patients_dropped_from_train"] = int(meta.table.loc[shared, "patient_id"].nunique())
    main = meta.table[~shared.to_numpy()]
    assignment = ratio_splits(main, (1 - val_fraction, val_fraction, 0.0), seed)
    table = pd.concat([main.assign(split=assignment), test_meta.table.assign(split="test")], ignore_index=True)
    method = {"kind": "test_table", "test_metadata": str(test_metadata), "val_fraction": val_fraction, "seed": seed}
    return table, method


def _split_by_test_table(steps: _Steps, meta, metadata: Path | None, images, test_metadata: Path, test_images,
                         val_fraction: float, seed: int) -> tuple[pd.DataFrame, dict]:
    """The located table and its split method with --test-metadata: each part located under its own images."""
    test_meta = steps.read(test_metadata, test_images or images, "--test-metadata")
    counts = steps.counts
    counts.update({f"test_table_{k}": v for k, v in test_meta.counts.items()})
    table, method = _with_test_table(meta, test_meta, test_metadata, val_fraction, seed, counts)
    check_no_leakage(table, table["split"])
    counts["unlisted"] = 0
    is_test = (table["split"] == "test").to_numpy()
    if len(meta.table) and is_test.all():
        steps.empty.append(f"--metadata {metadata}: all {len(meta.table)} rows are of --test-metadata patients, "
                           "who are not trained on")
    test_flag = "--test-images" if test_images else "--images"
    table = pd.concat([
        steps.located(table[~is_test], images, "images_missing", "--images"),
        steps.located(table[is_test], test_images or images, "test_images_missing", test_flag),
    ], ignore_index=True)
    counts["images_missing"] += counts.pop("test_images_missing")
    return table, method


def _split_by_lists_or_ratios(steps: _Steps, meta, metadata: Path | None, images, split: str, train_val_list,
                              test_list, val_fraction: float, ratios, seed: int) -> tuple[pd.DataFrame, dict]:
    """The located table and its split method: the official lists (by flag or beside the metadata file) where
    `split` allows them and they exist, else seeded patient ratios; rows no list names leave."""
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
    steps.counts["unlisted"] = int(table["split"].isna().sum())
    if len(table) and steps.counts["unlisted"] == len(table):
        steps.empty.append(f"{lists[0]}, {lists[1]}: the split lists name none of the {len(table)} images of "
                           f"--metadata {metadata} (e.g. {table['image_id'].iloc[0]})")
    return steps.located(table[table["split"].notna()], images, "images_missing", "--images"), method


def build_image_table(
    dataset: str,
    metadata: str | Path | None,
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
    test_metadata: str | Path | None = None,
    test_images: str | Path | None = None,
    mapping: TableMapping | None = None,
    label_table: str | Path | None = None,
    workers: int | None = None,
) -> ImageTable:
    """The located, split image table. With `test_metadata`, its rows (under `test_images`, default
    `images`) are the test split and the main table's patients are split into train and val.
    `mapping` names the table kind's columns (and the dicom kind's label layout), `label_table` the
    dicom kind's labels, `workers` its header-reading processes."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be at least 1")
    if test_metadata is not None and get_dataset(dataset).reads != "metadata":
        raise ValueError(f"--test-metadata: not for --dataset {dataset}, which reads no metadata file")
    metadata = Path(metadata) if metadata is not None else None
    steps = _Steps(dataset, {"frontal_only": not keep_laterals, "mapping": mapping or TableMapping(),
                             "label_table": label_table, "workers": workers, "log": log}, log)
    meta = steps.read(metadata, images, "--metadata")
    steps.counts.update(meta.counts)
    if test_metadata is not None:
        if split == "official" or train_val_list or test_list:
            raise ValueError("--test-metadata names the test split itself; leave out --split official and the lists")
        table, method = _split_by_test_table(steps, meta, metadata, images, Path(test_metadata), test_images,
                                             val_fraction, seed)
    else:
        table, method = _split_by_lists_or_ratios(steps, meta, metadata, images, split, train_val_list, test_list,
                                                  val_fraction, ratios, seed)
    table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
    if limit is not None:
        table = table.head(limit)
    if table.empty:  # a job must stop here, before it writes anything
        source = f"--metadata {metadata}" if metadata is not None else f"--images {images}"
        raise ValueError("; ".join(steps.empty) or f"{source}: no image left to process")
    counts = steps.counts
    counts["images"] = len(table)
    return ImageTable(meta.dataset, meta.label_names, table, counts, method)


def table_from_flags(args: argparse.Namespace, log=lambda msg: print(msg, file=sys.stderr)) -> ImageTable:
    """`build_image_table` from the flags common.data.table_flags.add_table_flags defines."""
    value = args.split_ratios  # "0.7,0.1,0.2" from a flag, or a list from a config file
    try:
        ratios = tuple(float(x) for x in (value if isinstance(value, (list, tuple)) else str(value).split(",")))
    except ValueError:
        raise ValueError(f"--split-ratios {value!r}: expected three comma-separated numbers") from None
    return build_image_table(args.dataset, args.metadata, args.images, args.split, args.train_val_list,
                             args.test_list, args.val_fraction, ratios, args.seed, args.keep_laterals,
                             args.limit, log=log, test_metadata=args.test_metadata, test_images=args.test_images,
                             mapping=mapping_from_flags(args), label_table=getattr(args, "label_table", None),
                             workers=getattr(args, "header_workers", None))


_LIST_FIELDS = ("label_columns", "label_names")


def mapping_from_flags(args: argparse.Namespace) -> TableMapping:
    """The column mapping: a --table-mapping file's [table] table, overridden by the flags given."""
    values, source = {}, getattr(args, "table_mapping", None)
    if source:
        for key, value in load_section(source, "table").items():
            name = key.replace("_", "-")
            if name not in MAPPING_KEYS:
                raise ConfigError(f"{source} [table] {key}: unknown key (one of {', '.join(MAPPING_KEYS)})")
            values[MAPPING_KEYS[name]] = value
    for name, field_ in MAPPING_KEYS.items():
        value = getattr(args, name.replace("-", "_"), None)
        if value is not None:
            values[field_] = value
    for field_ in _LIST_FIELDS:
        if field_ in values:
            flag = next(k for k, v in MAPPING_KEYS.items() if v == field_)
            values[field_] = tuple(parse_list(values[field_], str, flag))
    if not isinstance(values.get("blank_label", 0), int) or values.get("blank_label", 0) not in (0, -1):
        raise ConfigError(f"--blank-label {values['blank_label']!r}: must be 0 or -1")
    for field_, value in values.items():
        if field_ not in _LIST_FIELDS and field_ != "blank_label" and not isinstance(value, str):
            flag = next(k for k, v in MAPPING_KEYS.items() if v == field_)
            raise ConfigError(f"{source or 'flags'}: {flag} {value!r}: expected a column name (text)")
    return TableMapping(**values)
