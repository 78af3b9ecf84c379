"""Metadata readers: each dataset's table to one canonical pandas table.

Canonical columns (torchxrayvision-style contract): image_id, patient_id, view, age, sex, labels,
plus `path` once images are located (common/locate.py). `labels` holds one list per row in the
dataset's fixed label order (common/labels.py): 1 positive, 0 negative, -1 uncertain.
"""

from __future__ import annotations

import os
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
            raise MetadataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}{_separator_hint(header)}")
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


def _separator_hint(header) -> str:
    """A header read as one column that holds another separator: a spreadsheet's ';' or tab export."""
    if len(header) != 1:
        return ""
    found = [name for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "'|'")) if sep in str(header[0])]
    return (f"; the header reads as one column, separated by {found[0]} rather than commas: save the table as "
            "comma-separated CSV (or as Parquet)") if found else ""


def plain_relpath(path: str) -> str:
    """A table's relative image path without './' and empty segments ('./a//b.png' is 'a/b.png'), so one file has
    one spelling (and one image id); '..' stays, so a path never silently lands elsewhere. Absolute paths and
    URIs are kept as given."""
    if not path or path.startswith("/") or "://" in path:
        return path
    return "/".join(part for part in path.split("/") if part not in ("", "."))


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


def _parse_ages(raw: pd.Series, path: Path, first_row: int = 2) -> tuple[pd.Series, int]:
    """Ages in years as float32 (NaN unknown); implausible ages become NaN and are counted.

    Accepts plain numbers and the `058Y` form of some NIH copies. `first_row`: the number the
    messages give the table's first row (2 in a CSV, below its header).
    """
    text = raw.str.strip().str.upper().str.removesuffix("Y")
    age = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad_text = age.isna() & text.ne("")
    if bad_text.any():
        row = int(np.flatnonzero(bad_text.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + first_row}: age {raw.iloc[row]!r} is not a number")
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

    labels = _label_columns(raw, CHEXPERT_LABELS, 0, path)
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
            "labels": list(labels),
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


def _refuse_duplicate_ids(table: pd.DataFrame, path: Path, first_row: int = 2, column: str = "image_id") -> None:
    dup = table[column].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + first_row}: image {table[column].iloc[row]!r} appears twice")


# --- Labels in a table's own layout: shared by CheXpert, the table kind and the dicom kind's label table ---

LABEL_VALUES = (1.0, 0.0, -1.0)


def _label_columns(raw: pd.DataFrame, columns, blank: int, path: Path, first_row: int = 2) -> np.ndarray:
    """One column per label, values 1/0/-1 (1.0 ... as CheXpert writes them); a blank cell is `blank`."""
    values = raw[list(columns)].apply(lambda c: pd.to_numeric(c.where(c.str.strip() != "", str(blank)), errors="coerce"))
    bad = ~values.isin(LABEL_VALUES)
    if bad.to_numpy().any():
        row, col = (int(i[0]) for i in np.nonzero(bad.to_numpy()))
        raise MetadataError(f"{path}: row {row + first_row}: {columns[col]} = {raw.iloc[row][columns[col]]!r}, "
                            "expected 1, 0, -1 or blank")
    return values.to_numpy(np.int8)


def _label_findings(cells: pd.Series, names, separator: str, no_finding: str | None, blank: int, path: Path,
                    first_row: int = 2) -> np.ndarray:
    """One delimited findings column (NIH's `Finding Labels` layout): a listed name is 1, the others 0;
    `no_finding` lists nothing; a blank cell is `blank` for every label (0, or -1: not read)."""
    text = cells.reset_index(drop=True).str.strip()
    parts = text.str.split(separator, regex=False).explode().str.strip()
    parts = parts[parts.notna() & (parts != "") & (parts != no_finding)]
    unknown = ~parts.isin(names)
    if unknown.any():
        row = int(parts.index[unknown.to_numpy()][0])
        raise MetadataError(f"{path}: row {row + first_row}: unknown finding {parts[unknown].iloc[0]!r} in "
                            f"{cells.name!r} (not in --label-names)")
    labels = np.zeros((len(text), len(names)), np.int8)
    labels[parts.index.to_numpy(int), parts.map({n: i for i, n in enumerate(names)}).to_numpy(int)] = 1
    labels[(text == "").to_numpy()] = blank
    return labels


@dataclass(frozen=True)
class TableMapping:
    """Which columns of a local table hold what (`--path-column` ... or a --table-mapping TOML file)."""
    path: str | None = None  # image path, relative to --images or absolute
    patient: str | None = None  # required: splits are patient-level
    image_id: str | None = None  # default: the path
    view: str | None = None
    age: str | None = None  # years, numbers
    sex: str | None = None  # M/F, male/female ...; anything else unknown
    label_columns: tuple[str, ...] = ()  # one column per label, or:
    findings: str | None = None  # one delimited column of names from `label_names`
    findings_separator: str = "|"
    label_names: tuple[str, ...] = ()
    no_finding: str | None = None  # the findings token meaning "all 0", e.g. "No Finding"
    blank_label: int = 0  # a blank label cell: 0 (as CheXpert) or -1 (uncertain)
    label_key: str = "SOPInstanceUID"  # dicom kind: the --label-table column matched to each file

    def label_layout(self, where: str) -> tuple[str, ...]:
        """The label names, after refusing a layout that is missing or given twice."""
        if self.blank_label not in (0, -1):
            raise MetadataError(f"--blank-label {self.blank_label}: must be 0 or -1")
        if self.label_columns and self.findings:
            raise MetadataError(f"{where}: give --label-columns or --findings-column, not both")
        if self.findings:
            if not self.label_names:
                raise MetadataError(f"--findings-column {self.findings!r}: needs --label-names (the allowed names, in order)")
            return tuple(self.label_names)
        if not self.label_columns:
            raise MetadataError(f"{where}: name the labels with --label-columns A,B,C or --findings-column "
                                "with --label-names")
        if self.label_names and tuple(self.label_names) != tuple(self.label_columns):
            raise MetadataError("--label-names goes with --findings-column; --label-columns names the labels itself")
        return tuple(self.label_columns)

    def label_source_columns(self) -> list[str]:
        return [self.findings] if self.findings else list(self.label_columns)

    def labels(self, raw: pd.DataFrame, path: Path, first_row: int) -> np.ndarray:
        if self.findings:
            return _label_findings(raw[self.findings], self.label_names, self.findings_separator, self.no_finding,
                                   self.blank_label, path, first_row)
        return _label_columns(raw, list(self.label_columns), self.blank_label, path, first_row)


def _first_row(path: Path) -> int:
    """The number messages give a table's first row: 2 in a CSV (line 1 is the header), 1 in Parquet."""
    return 1 if _is_parquet(path) else 2


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _read_parquet(path: Path, columns: list[str]) -> pd.DataFrame:
    """The named columns as strings ('' for null), as _read_csv gives them."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise MetadataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
        table = pq.read_table(path, columns=columns).to_pandas()
    except MetadataError:
        raise
    except Exception as exc:  # pyarrow's errors for a truncated or foreign file
        raise MetadataError(f"{path}: not a readable Parquet file: {' '.join(str(exc).split())}") from None
    if table.empty:
        raise MetadataError(f"{path}: no rows")
    return pd.DataFrame({c: table[c].astype("string").fillna("").astype(object) for c in columns})


def read_any_table(path: Path, columns: list[str]) -> pd.DataFrame:
    columns = list(dict.fromkeys(columns))  # one column may serve twice (e.g. path and image id)
    return _read_parquet(path, columns) if _is_parquet(path) else _read_csv(path, columns)


_SEX_WORDS = {"m": 1, "male": 1, "man": 1, "f": 0, "female": 0, "woman": 0}


def _sex_words(raw: pd.Series) -> pd.Series:
    """1 male, 0 female from M/F and their common spellings (any case); <NA> for anything else."""
    return raw.str.strip().str.lower().map(_SEX_WORDS).astype("Int8")


def _required_text(raw: pd.DataFrame, column: str, path: Path, first_row: int, why: str) -> pd.Series:
    values = raw[column].str.strip()
    blank = values == ""
    if blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + first_row}: {column} is blank ({why})")
    return values


def read_table(path: str | Path, mapping: TableMapping) -> Metadata:
    """Any labelled image table (CSV or Parquet), its columns named by `mapping` (the `table` kind).

    Rows keep a `file` column (the path as given) by which common/locate.py finds the image.
    """
    path = Path(path)
    names = mapping.label_layout(f"--dataset table {path}")
    if not mapping.path:
        raise MetadataError("--path-column: the table kind needs the column of image paths")
    if not mapping.patient:
        raise MetadataError("--patient-column: the table kind needs the patient column (splits are patient-level)")
    optional = [mapping.image_id, mapping.view, mapping.age, mapping.sex]
    raw = read_any_table(path, [mapping.path, mapping.patient, *filter(None, optional), *mapping.label_source_columns()])
    first = _first_row(path)
    file = _required_text(raw, mapping.path, path, first, "every row needs its image").map(plain_relpath)
    if mapping.age:
        age, age_dropped = _parse_ages(raw[mapping.age], path, first)
    else:
        age, age_dropped = pd.Series(np.nan, index=raw.index, dtype="float32"), 0
    table = pd.DataFrame({
        "image_id": raw[mapping.image_id].str.strip() if mapping.image_id else file,
        "patient_id": _required_text(raw, mapping.patient, path, first, "splits are patient-level"),
        "view": raw[mapping.view].str.strip().str.upper().replace("", None) if mapping.view else None,
        "age": age,
        "sex": _sex_words(raw[mapping.sex]) if mapping.sex else pd.Series(pd.NA, index=raw.index, dtype="Int8"),
        "labels": list(mapping.labels(raw, path, first)),
        "file": file,
    })
    _refuse_duplicate_ids(table, path, first)
    return Metadata("table", names, table, {"rows_read": len(raw), "age_dropped": age_dropped})


# --- The dicom kind: the canonical table from the files' own headers ---

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
    from common.dicom import is_dicom, named_dicom, read_dataset

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
    import concurrent.futures
    import multiprocessing
    import os

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
    from common.locate import is_regular_file, walk_files

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
    first = _first_row(path)
    keys = _required_text(raw, mapping.label_key, path, first, "every label row needs its key")
    _refuse_duplicate_ids(pd.DataFrame({"key": keys}), path, first, column="key")
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
