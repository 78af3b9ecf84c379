"""Patient-level train/val/test splits: official lists, or seeded ratios for any dataset.

A patient never appears in two splits; `check_no_leakage` enforces it after any assignment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_RATIOS = (0.7, 0.1, 0.2)


class SplitError(ValueError):
    pass


def _shuffled_patients(patients: pd.Series, seed: int) -> np.ndarray:
    # Sorting first makes the result depend on the seed alone, not on the row order of the CSV.
    unique = np.sort(patients.unique().astype(str))
    return np.random.default_rng(seed).permutation(unique)


def read_list(path: str | Path) -> set[str]:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: split list not found")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def official_splits(
    table: pd.DataFrame, train_val_list: str | Path, test_list: str | Path, val_fraction: float, seed: int
) -> pd.Series:
    """NIH's official lists, with a seeded patient-level share of train_val carved out as val.

    Rows in neither list get <NA> (the caller drops and counts them).
    """
    if not 0 <= val_fraction < 1:
        raise SplitError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    train_val, test = read_list(train_val_list), read_list(test_list)
    both = train_val & test
    if both:
        raise SplitError(f"{test_list}: {len(both)} images also in {train_val_list}, e.g. {sorted(both)[0]}")
    split = pd.Series(pd.NA, index=table.index, dtype="string")
    split[table["image_id"].isin(train_val)] = "train"
    split[table["image_id"].isin(test)] = "test"

    train_patients = _shuffled_patients(table.loc[split == "train", "patient_id"], seed)
    val_patients = train_patients[: int(round(val_fraction * len(train_patients)))]
    split[(split == "train") & table["patient_id"].isin(val_patients)] = "val"
    return split


def ratio_splits(table: pd.DataFrame, ratios: tuple[float, float, float], seed: int) -> pd.Series:
    """Seeded patient-level train/val/test by the share of patients in each."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise SplitError(f"--split-ratios {ratios}: need three non-negative shares that sum to 1")
    patients = _shuffled_patients(table["patient_id"], seed)
    n_train = int(round(ratios[0] * len(patients)))
    n_val = int(round(ratios[1] * len(patients)))
    names = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (len(patients) - n_train - n_val))
    by_patient = pd.Series(names, index=patients)
    return pd.Series(table["patient_id"].astype(str).map(by_patient).to_numpy(), index=table.index, dtype="string")


def check_no_leakage(table: pd.DataFrame, split: pd.Series) -> None:
    """Refuse an assignment that puts one patient in two splits."""
    per_patient = pd.DataFrame({"p": table["patient_id"], "s": split}).dropna().groupby("p")["s"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        raise SplitError(f"patient {leaking.index[0]} is in more than one split ({len(leaking)} patients leak)")
