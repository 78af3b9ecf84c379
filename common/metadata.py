"""Metadata readers: each dataset's table to one canonical pandas table.

Canonical columns (torchxrayvision-style contract): image_id, patient_id, view, age, sex, labels,
plus `path` once images are located (common/locate.py). `labels` holds one list per row in the
dataset's fixed label order (common/labels.py): 1 positive, 0 negative, -1 uncertain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.labels import CHEXPERT_LABELS, NIH_LABELS, NIH_NO_FINDING

MAX_PLAUSIBLE_AGE = 120.0
CANONICAL_COLUMNS = ("image_id", "patient_id", "view", "age", "sex", "labels")


class MetadataError(ValueError):
    """A metadata file that cannot be read; the message names the file and row or column."""


@dataclass
class Metadata:
    dataset: str
    label_names: tuple[str, ...]
    table: pd.DataFrame
    counts: dict = field(default_factory=dict)  # rows read, ages dropped, laterals dropped, ...


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Read only the named columns as strings.

    Selecting columns by name makes the reader indifferent to the NIH header variants: the 2020
    file's `OriginalImage[Width,Height]` splits into two names, and the 2017 file adds a trailing
    empty column. `index_col=False` stops pandas from taking a row's first field as an index when
    rows are wider than the header.
    """
    if not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    if path.stat().st_size == 0:
        raise MetadataError(f"{path}: empty file (0 bytes)")
    try:
        header = pd.read_csv(path, nrows=0, index_col=False).columns
        missing = [c for c in columns if c not in header]
        if missing:
            raise MetadataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
        table = pd.read_csv(path, usecols=columns, dtype=str, index_col=False, keep_default_na=False)
    except UnicodeDecodeError:
        raise MetadataError(not_utf8(path)) from None
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{path}: no header line, only blank lines") from None
    except pd.errors.ParserError as exc:
        raise MetadataError(f"{path}: not a readable CSV: {' '.join(str(exc).split())}") from None
    # Refused here rather than passed on as an empty table: a metadata file without rows is a
    # truncated copy or the wrong file, and every job would otherwise fail later and vaguer.
    if table.empty:
        raise MetadataError(f"{path}: no rows below the header")
    return table


def not_utf8(path: Path) -> str:
    """The message for a file that is not UTF-8, naming its first bad line. Scanned only once a
    decode has failed (pandas' own error gives an offset into a buffer, not a line); a multi-byte
    character never spans a newline, so decoding line by line finds the same byte."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"{path}: line {number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}, "
                        "e.g. Latin-1 text); save the file as UTF-8")
    return f"{path}: not UTF-8; save the file as UTF-8"


def _parse_ages(raw: pd.Series, path: Path) -> tuple[pd.Series, int]:
    """Ages in years as float32 (NaN unknown); implausible ages become NaN and are counted.

    Accepts plain numbers and the `058Y` form of some NIH copies.
    """
    text = raw.str.strip().str.upper().str.removesuffix("Y")
    age = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad_text = age.isna() & text.ne("")
    if bad_text.any():
        row = int(np.flatnonzero(bad_text.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + 2}: age {raw.iloc[row]!r} is not a number")
    implausible = (age > MAX_PLAUSIBLE_AGE) | (age < 0)
    return age.mask(implausible).astype("float32"), int(implausible.sum())


def _parse_sex(raw: pd.Series, male: str, female: str) -> pd.Series:
    """1 male, 0 female, <NA> for anything else (e.g. CheXpert's 'Unknown')."""
    sex = pd.Series(pd.NA, index=raw.index, dtype="Int8")
    sex[raw.str.strip() == male] = 1
    sex[raw.str.strip() == female] = 0
    return sex


def read_nih(path: str | Path) -> Metadata:
    """NIH ChestX-ray14 `Data_Entry_2017*.csv` (2017 or 2020 revision)."""
    path = Path(path)
    columns = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    raw = _read_csv(path, columns)

    findings = raw["Finding Labels"].str.strip().str.get_dummies(sep="|")
    unknown = sorted(set(findings.columns) - set(NIH_LABELS) - {NIH_NO_FINDING})
    if unknown:
        row = int(np.flatnonzero(findings[unknown[0]].to_numpy())[0])
        raise MetadataError(f"{path}: row {row + 2}: unknown finding {unknown[0]!r}")
    labels = findings.reindex(columns=list(NIH_LABELS), fill_value=0).to_numpy(np.int8)

    patient = pd.to_numeric(raw["Patient ID"], errors="coerce")
    if patient.isna().any():
        row = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise MetadataError(f"{path}: row {row + 2}: Patient ID {raw['Patient ID'].iloc[row]!r} is not a number")
    age, age_dropped = _parse_ages(raw["Patient Age"], path)

    table = pd.DataFrame(
        {
            "image_id": raw["Image Index"].str.strip(),
            "patient_id": patient.astype("int64").map("{:08d}".format),
            "view": raw["View Position"].str.strip().str.upper().replace("", None),
            "age": age,
            "sex": _parse_sex(raw["Patient Gender"], "M", "F"),
            "labels": list(labels),
        }
    )
    _refuse_duplicate_ids(table, path)
    return Metadata("nih", NIH_LABELS, table, {"rows_read": len(raw), "age_dropped": age_dropped})


_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


def read_chexpert(path: str | Path, frontal_only: bool = True) -> Metadata:
    """CheXpert `train.csv` / `valid.csv`: uncertain labels kept raw (-1), blank means 0."""
    path = Path(path)
    raw = _read_csv(path, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])

    values = raw[list(CHEXPERT_LABELS)].apply(lambda c: pd.to_numeric(c.where(c.str.strip() != "", "0"), errors="coerce"))
    bad = ~values.isin([1.0, 0.0, -1.0])
    if bad.to_numpy().any():
        row, col = (int(i[0]) for i in np.nonzero(bad.to_numpy()))
        raise MetadataError(
            f"{path}: row {row + 2}: {CHEXPERT_LABELS[col]} = {raw.iloc[row][CHEXPERT_LABELS[col]]!r}, expected 1, 0, -1 or blank"
        )
    patient = raw["Path"].str.extract(_CHEXPERT_PATIENT, expand=False)
    if patient.isna().any():
        row = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise MetadataError(f"{path}: row {row + 2}: no patientNNNNN in path {raw['Path'].iloc[row]!r}")

    frontal = raw["Frontal/Lateral"].str.strip() == "Frontal"
    view = raw["AP/PA"].str.strip().str.upper().where(frontal, "LATERAL").replace("", None)
    age, age_dropped = _parse_ages(raw["Age"], path)
    # CheXpert codes an unknown age as 0 (no radiograph in it is of a newborn's age in years).
    zero_age = age == 0
    age, age_dropped = age.mask(zero_age), age_dropped + int(zero_age.sum())
    table = pd.DataFrame(
        {
            "image_id": raw["Path"].str.strip(),
            "patient_id": patient,
            "view": view,
            "age": age,
            "sex": _parse_sex(raw["Sex"], "Male", "Female"),
            "labels": list(values.to_numpy(np.int8)),
        }
    )
    counts = {"rows_read": len(raw), "age_dropped": age_dropped, "laterals_dropped": 0}
    if frontal_only:
        counts["laterals_dropped"] = int((~frontal).sum())
        table = table[frontal.to_numpy()].reset_index(drop=True)
    _refuse_duplicate_ids(table, path)
    return Metadata("chexpert", CHEXPERT_LABELS, table, counts)


_CHEXPERT_STUDY = re.compile(r"patient\d+/study\d+")


def study_ids(dataset: str, image_ids) -> np.ndarray | None:
    """Each image's study where the dataset has studies (CheXpert: patientNNNNN/studyN/, the image's
    folder), for study-level scores; None for datasets without (NIH: one image per visit)."""
    if dataset != "chexpert":
        return None
    found = [_CHEXPERT_STUDY.search(str(i)) for i in image_ids]
    if not all(found):
        return None  # ids not laid out as CheXpert's patient/study folders: no study to group by
    return np.asarray([m.group(0) for m in found], dtype=object)


def _refuse_duplicate_ids(table: pd.DataFrame, path: Path) -> None:
    dup = table["image_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + 2}: image {table['image_id'].iloc[row]!r} appears twice")
