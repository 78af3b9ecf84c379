"""The dicom kind: the canonical table (common/data/tables.py) from the DICOM files' own headers, scanned in a
process pool, with labels joined from an optional label table keyed by SOPInstanceUID or file name."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from common.images.dicom import is_dicom, named_dicom, read_dataset
from common.data.locate import is_regular_file, walk_files
from common.data.tables import (MAX_PLAUSIBLE_AGE, Metadata, MetadataError, TableMapping, first_row, read_any_table,
                           refuse_duplicate_ids, required_text)

# The only tags read, and the only ones kept (personal data: PatientName, birth date, institution ...
# are never read: `specific_tags` stops pydicom from parsing anything else, and the table has no place for them).
DICOM_TAGS = ("PatientID", "PatientSex", "PatientAge", "ViewPosition", "SOPInstanceUID")
_DICOM_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
HEADER_CHUNK = 256  # files per pool task: large enough that pickling and scheduling cost little
NOT_CLAIMED = "neither a DICOM name nor the DICM marker"  # another kind of file: passed over, not "skipped"


def read_dicom_headers(paths: list[str]) -> list[tuple]:
    """(PatientID, PatientSex, PatientAge, ViewPosition, SOPInstanceUID) as text per file, or
    (None, reason): a file that is not DICOM is a reason, never an exception. A process pool's task."""
    out = []
    for path in paths:
        try:
            if not named_dicom(path) and not is_dicom(path):
                out.append((None, NOT_CLAIMED))  # IM000123 may be DICOM; notes.txt, without the marker, is not
                continue
            ds = read_dataset(path, DICOM_TAGS, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - not DICOM, truncated, unreadable: counted by the caller
            out.append((None, "not DICOM" if isinstance(exc, ValueError) else f"not DICOM ({type(exc).__name__})"))
            continue
        values = tuple(str(ds.get(tag, "") or "").strip() for tag in DICOM_TAGS)
        out.append(values if values[0] else (None, "no PatientID"))
    return out


def scan_dicom_headers(paths: list[str], workers: int | None = None) -> list[tuple]:
    """read_dicom_headers over every file, in a process pool unless one worker (or one chunk) suffices:
    parsing is CPU-bound Python, so threads would share one core."""
    workers = workers or os.cpu_count() or 1
    chunks = [paths[i:i + HEADER_CHUNK] for i in range(0, len(paths), HEADER_CHUNK)]
    if workers == 1 or len(chunks) <= 1:
        return read_dicom_headers(paths)
    # forkserver, not fork: the driver may hold threads (Spark's py4j) that a fork would copy half-held.
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        return [row for rows in pool.map(read_dicom_headers, chunks) for row in rows]


def dicom_age_years(text: str) -> float | None:
    """DICOM AS (`045Y`, `006M`, `010W`, `003D`) in years; None when absent, malformed or implausible."""
    found = _DICOM_AGE.match(text.strip().upper())
    if not found:
        return None
    years = int(found.group(1)) * _DAYS_PER[found.group(2)] / 365.25
    return years if years <= MAX_PLAUSIBLE_AGE else None


def read_dicom(root: str | Path, mapping: TableMapping | None = None, label_table: str | Path | None = None,
               workers: int | None = None, log=print) -> Metadata:
    """Every DICOM file below `root`, described by its headers; labels from `label_table` when given.

    A DICOM file is one named *.dcm, *.dicom or *.dic, or any other file with the 'DICM' marker (exports
    name files by UID or number); DICOMDIR, the export's index, is passed over. image_id is the
    SOPInstanceUID (the relative path when a file has none); rows carry their `path`.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory")
    candidates = [e.path for e in walk_files(root) if e.name.upper() != "DICOMDIR" and is_regular_file(e)]
    headers = scan_dicom_headers(candidates, workers)
    claimed = [(f, h) for f, h in zip(candidates, headers) if h != (None, NOT_CLAIMED)]
    good = [(f, h) for f, h in claimed if h[0] is not None]
    skipped = [(f, h[1]) for f, h in claimed if h[0] is None]
    counts = {"rows_read": len(claimed), "other_files": len(candidates) - len(claimed), "not_dicom": 0,
              "no_patient_id": 0}
    for _, reason in skipped:
        counts["no_patient_id" if reason == "no PatientID" else "not_dicom"] += 1
    if skipped:
        examples = ", ".join(f"{os.path.relpath(f, root)} ({why})" for f, why in skipped[:3])
        log(f"{len(skipped)} of {len(claimed)} DICOM files under {root} skipped: {counts['not_dicom']} not DICOM, "
            f"{counts['no_patient_id']} without PatientID (e.g. {examples})")
    if not good:
        raise MetadataError(f"--images {root}: no readable DICOM file with a PatientID below it "
                            f"({len(claimed)} DICOM files, {counts['other_files']} other files)")
    table = _dicom_rows(root, good, counts)
    names: tuple[str, ...] = ()
    if label_table is not None:
        table, names = _join_labels(table, Path(label_table), mapping or TableMapping(), counts, log)
    elif mapping is not None and (mapping.label_columns or mapping.findings):
        raise MetadataError("--label-columns/--findings-column: --dataset dicom reads them from --label-table FILE")
    return Metadata("dicom", names, table, counts)


def _dicom_rows(root: Path, good: list[tuple], counts: dict) -> pd.DataFrame:
    paths = [f for f, _ in good]
    patient, sex, age_text, view, uid = (list(c) for c in zip(*(h for _, h in good)))
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in paths]
    ages = [dicom_age_years(a) for a in age_text]
    counts["age_missing"] = sum(a == "" for a in age_text)
    counts["age_dropped"] = sum(y is None for y in ages) - counts["age_missing"]  # malformed or implausible
    counts["uid_missing"] = sum(u == "" for u in uid)
    table = pd.DataFrame({
        "image_id": [u or r for u, r in zip(uid, rel)],
        "patient_id": patient,
        "view": pd.Series(view, dtype=object).str.upper().replace("", None),
        "age": pd.Series([np.nan if a is None else a for a in ages], dtype="float32"),
        "sex": pd.Series(sex, dtype=object).str.upper().map({"M": 1, "F": 0}).astype("Int8"),
        "labels": [np.zeros(0, np.int8)] * len(paths),
        "path": paths,
        "file": rel,
    })
    dup = table["image_id"].duplicated()
    counts["duplicate_uid"] = int(dup.sum())  # the same image copied twice: one row
    return table[~dup.to_numpy()].reset_index(drop=True)


def _join_labels(table: pd.DataFrame, path: Path, mapping: TableMapping, counts: dict, log) -> tuple:
    """Labels per file from a table keyed by SOPInstanceUID, the path relative to --images or the file name."""
    names = mapping.label_layout(f"--label-table {path}")
    raw = read_any_table(path, [mapping.label_key, *mapping.label_source_columns()])
    first = first_row(path)
    keys = required_text(raw, mapping.label_key, path, first, "every label row needs its key")
    refuse_duplicate_ids(pd.DataFrame({"key": keys}), path, first, column="key")
    row_of = pd.Series(np.arange(len(keys)), index=keys.to_numpy())
    base = table["file"].map(os.path.basename)
    unique_base = base.where(~base.duplicated(keep=False))  # a name that repeats in two folders keys nothing
    row = table["image_id"].map(row_of).fillna(table["file"].map(row_of)).fillna(unique_base.map(row_of))
    labels = mapping.labels(raw, path, first)
    found = row.notna().to_numpy()
    counts["labels_missing"] = int((~found).sum())
    counts["label_rows_unmatched"] = int(len(keys) - row[found].nunique())
    if counts["labels_missing"]:
        log(f"{counts['labels_missing']} of {len(table)} DICOM files have no row in --label-table {path} "
            f"(e.g. {', '.join(table.loc[~found, 'file'].head(3))}); they are skipped")
    table = table[found].reset_index(drop=True)
    table["labels"] = list(labels[row[found].to_numpy(int)])
    return table, names
