"""The table kind: any labelled image table (CSV or Parquet) whose columns a TableMapping names, to the
canonical table (common/data/tables.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.data.tables import (Metadata, MetadataError, TableMapping, first_row, parse_ages, plain_relpath, read_any_table,
                           refuse_duplicate_ids, required_text, sex_words)


def read_table(path: str | Path, mapping: TableMapping) -> Metadata:
    """Any labelled image table (CSV or Parquet), its columns named by `mapping` (the `table` kind).

    Rows keep a `file` column (the path as given) by which common/data/locate.py finds the image.
    """
    path = Path(path)
    names = mapping.label_layout(f"--dataset table {path}")
    if not mapping.path:
        raise MetadataError("--path-column: the table kind needs the column of image paths")
    if not mapping.patient:
        raise MetadataError("--patient-column: the table kind needs the patient column (splits are patient-level)")
    optional = [mapping.image_id, mapping.view, mapping.age, mapping.sex]
    raw = read_any_table(path, [mapping.path, mapping.patient, *filter(None, optional), *mapping.label_source_columns()])
    first = first_row(path)
    file = required_text(raw, mapping.path, path, first, "every row needs its image").map(plain_relpath)
    if mapping.age:
        age, age_dropped = parse_ages(raw[mapping.age], path, first)
    else:
        age, age_dropped = pd.Series(np.nan, index=raw.index, dtype="float32"), 0
    table = pd.DataFrame({
        "image_id": raw[mapping.image_id].str.strip() if mapping.image_id else file,
        "patient_id": required_text(raw, mapping.patient, path, first, "splits are patient-level"),
        "view": raw[mapping.view].str.strip().str.upper().replace("", None) if mapping.view else None,
        "age": age,
        "sex": sex_words(raw[mapping.sex]) if mapping.sex else pd.Series(pd.NA, index=raw.index, dtype="Int8"),
        "labels": list(mapping.labels(raw, path, first)),
        "file": file,
    })
    refuse_duplicate_ids(table, path, first)
    return Metadata("table", names, table, {"rows_read": len(raw), "age_dropped": age_dropped})
