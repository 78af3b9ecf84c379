"""What every metadata reader shares: the canonical table and its contract (image_id, patient_id, view,
age, sex, labels, plus `path` once images are located by common/data/locate.py; `labels` holds one list per row in
the dataset's fixed label order from common/data/labels.py: 1 positive, 0 negative, -1 uncertain), CSV and Parquet
reading with one-line errors, age and sex parsing, duplicate-id refusal and the label layouts of a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
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


def parse_ages(raw: pd.Series, path: Path, first_row: int = 2) -> tuple[pd.Series, int]:
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


def parse_sex(raw: pd.Series, male: str, female: str) -> pd.Series:
    """1 male, 0 female, <NA> for anything else (e.g. CheXpert's 'Unknown')."""
    sex = pd.Series(pd.NA, index=raw.index, dtype="Int8")
    sex[raw.str.strip() == male] = 1
    sex[raw.str.strip() == female] = 0
    return sex


def refuse_duplicate_ids(table: pd.DataFrame, path: Path, first_row: int = 2, column: str = "image_id") -> None:
    dup = table[column].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + first_row}: image {table[column].iloc[row]!r} appears twice")


# --- Labels in a table's own layout: shared by CheXpert, the table kind and the dicom kind's label table ---

LABEL_VALUES = (1.0, 0.0, -1.0)


def label_columns(raw: pd.DataFrame, columns, blank: int, path: Path, first_row: int = 2) -> np.ndarray:
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
        return label_columns(raw, list(self.label_columns), self.blank_label, path, first_row)


def first_row(path: Path) -> int:
    """The number messages give a table's first row: 2 in a CSV (line 1 is the header), 1 in Parquet."""
    return 1 if _is_parquet(path) else 2


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _read_parquet(path: Path, columns: list[str]) -> pd.DataFrame:
    """The named columns as strings ('' for null), as read_csv gives them."""
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
    return _read_parquet(path, columns) if _is_parquet(path) else read_csv(path, columns)


_SEX_WORDS = {"m": 1, "male": 1, "man": 1, "f": 0, "female": 0, "woman": 0}


def sex_words(raw: pd.Series) -> pd.Series:
    """1 male, 0 female from M/F and their common spellings (any case); <NA> for anything else."""
    return raw.str.strip().str.lower().map(_SEX_WORDS).astype("Int8")


def required_text(raw: pd.DataFrame, column: str, path: Path, first_row: int, why: str) -> pd.Series:
    values = raw[column].str.strip()
    blank = values == ""
    if blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0])
        raise MetadataError(f"{path}: row {row + first_row}: {column} is blank ({why})")
    return values
