"""Patient-level train/val/test splits: official lists, or seeded ratios for any dataset.

A patient never appears in two splits; `check_no_leakage` enforces it after any assignment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

DEFAULT_RATIOS = (0.7, 0.1, 0.2)


class SplitError(ValueError):
    pass


def _shuffled_patients(patients: Iterable, seed: int) -> np.ndarray:
    # Deduplicated and sorted first, so the result depends on the seed and the set of patients alone, not on row order.
    values = patients.unique() if isinstance(patients, pd.Series) else np.asarray(list(patients), dtype=object)
    return np.random.default_rng(seed).permutation(np.unique(values.astype(str)))


def check_ratios(ratios: Iterable[float], flag: str) -> tuple[float, float, float]:
    """Three non-negative train/val/test shares that sum to 1, as floats; `flag` names them in the error."""
    shares = [float(r) for r in ratios]
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise SplitError(f"{flag} {shares}: give three non-negative fractions that sum to 1")
    return shares[0], shares[1], shares[2]


def assign_groups(groups: Iterable, ratios: Iterable[float], seed: int, flag: str = "--split-ratios") -> dict[str, str]:
    """Seeded train/val/test of whole groups (patients): {group as str: split}, by the share of groups in each.

    Repeats of a group count once. Train and val get round(share * n) groups each (val no more than train
    leaves), test the rest; so a group never straddles two splits, and one seed gives one assignment.
    """
    shares = check_ratios(ratios, flag)
    order = _shuffled_patients(groups, seed).tolist()
    n = len(order)
    n_train = min(int(round(shares[0] * n)), n)
    n_val = min(int(round(shares[1] * n)), n - n_train)
    return {g: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, g in enumerate(order)}


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
    """Seeded patient-level train/val/test by the share of patients in each (`assign_groups` over patient_id)."""
    patients = table["patient_id"].astype(str)
    by_patient = assign_groups(patients, ratios, seed)
    return pd.Series(patients.map(by_patient).to_numpy(), index=table.index, dtype="string")


def check_no_leakage(table: pd.DataFrame, split: pd.Series) -> None:
    """Refuse an assignment that puts one patient in two splits."""
    per_patient = pd.DataFrame({"p": table["patient_id"], "s": split}).dropna().groupby("p")["s"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        raise SplitError(f"patient {leaking.index[0]} is in more than one split ({len(leaking)} patients leak)")
