"""The CheXpert kind: `train.csv` / `valid.csv` to the canonical table (common/data/tables.py), the patient taken
from each image's path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.labels import CHEXPERT_LABELS
from common.data.tables import Metadata, MetadataError, label_columns, parse_ages, parse_sex, read_csv, refuse_duplicate_ids

_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


def read_chexpert(path: str | Path, frontal_only: bool = True) -> Metadata:
    """CheXpert `train.csv` / `valid.csv`: uncertain labels kept raw (-1), blank means 0."""
    path = Path(path)
    raw = read_csv(path, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])

    labels = label_columns(raw, CHEXPERT_LABELS, 0, path)
    patient = raw["Path"].str.extract(_CHEXPERT_PATIENT, expand=False)
    if patient.isna().any():
        row = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise MetadataError(f"{path}: row {row + 2}: no patientNNNNN in path {raw['Path'].iloc[row]!r}")

    frontal = raw["Frontal/Lateral"].str.strip() == "Frontal"
    view = raw["AP/PA"].str.strip().str.upper().where(frontal, "LATERAL").replace("", None)
    age, age_dropped = parse_ages(raw["Age"], path)
    # CheXpert codes an unknown age as 0 (no radiograph in it is of a newborn's age in years).
    zero_age = age == 0
    age, age_dropped = age.mask(zero_age), age_dropped + int(zero_age.sum())
    table = pd.DataFrame(
        {
            "image_id": raw["Path"].str.strip(),
            "patient_id": patient,
            "view": view,
            "age": age,
            "sex": parse_sex(raw["Sex"], "Male", "Female"),
            "labels": list(labels),
        }
    )
    counts = {"rows_read": len(raw), "age_dropped": age_dropped, "laterals_dropped": 0}
    if frontal_only:
        counts["laterals_dropped"] = int((~frontal).sum())
        table = table[frontal.to_numpy()].reset_index(drop=True)
    refuse_duplicate_ids(table, path)
    return Metadata("chexpert", CHEXPERT_LABELS, table, counts)
