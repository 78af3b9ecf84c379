"""The NIH ChestX-ray14 kind: `Data_Entry_2017*.csv` to the canonical table (common/data/tables.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.data.labels import NIH_LABELS, NIH_NO_FINDING
from common.data.tables import Metadata, MetadataError, parse_ages, parse_sex, read_csv, refuse_duplicate_ids


def read_nih(path: str | Path) -> Metadata:
    """NIH ChestX-ray14 `Data_Entry_2017*.csv` (2017 or 2020 revision)."""
    path = Path(path)
    columns = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    raw = read_csv(path, columns)

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
    age, age_dropped = parse_ages(raw["Patient Age"], path)

    table = pd.DataFrame(
        {
            "image_id": raw["Image Index"].str.strip(),
            "patient_id": patient.astype("int64").map("{:08d}".format),
            "view": raw["View Position"].str.strip().str.upper().replace("", None),
            "age": age,
            "sex": parse_sex(raw["Patient Gender"], "M", "F"),
            "labels": list(labels),
        }
    )
    refuse_duplicate_ids(table, path)
    return Metadata("nih", NIH_LABELS, table, {"rows_read": len(raw), "age_dropped": age_dropped})
