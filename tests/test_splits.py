import pandas as pd
import pytest

from common.data.nih import read_nih
from common.data.splits import SplitError, check_no_leakage, official_splits, ratio_splits, read_list
from tests.data_paths import NIH, NIH_CSV, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def table():
    return read_nih(NIH_CSV).table


def official(table, seed=0):
    return official_splits(table, NIH / "train_val_list.txt", NIH / "test_list.txt", 0.1, seed)


def patients_per_split(table, split):
    return {s: set(table.loc[split == s, "patient_id"]) for s in ("train", "val", "test")}


def test_official_lists_with_val_carve_out_never_leak_a_patient(table):
    split = official(table)
    check_no_leakage(table, split)
    groups = patients_per_split(table, split)
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert set(table.loc[split == "test", "image_id"]) == read_list(NIH / "test_list.txt")
    assert split.notna().all() and (split == "test").sum() == 25_596
    share = len(groups["val"]) / (len(groups["val"]) + len(groups["train"]))
    assert share == pytest.approx(0.1, abs=0.001)


def test_official_val_carve_out_is_seeded(table):
    assert official(table, seed=0).equals(official(table, seed=0))
    assert not official(table, seed=0).equals(official(table, seed=1))


def test_ratio_splits_are_patient_level_seeded_and_near_the_ratios(table):
    split = ratio_splits(table, (0.7, 0.1, 0.2), seed=3)
    check_no_leakage(table, split)
    groups = patients_per_split(table, split)
    n = sum(len(g) for g in groups.values())
    assert n == table["patient_id"].nunique()
    assert len(groups["train"]) / n == pytest.approx(0.7, abs=0.001)
    assert len(groups["test"]) / n == pytest.approx(0.2, abs=0.001)
    assert split.equals(ratio_splits(table.sample(frac=1, random_state=1), (0.7, 0.1, 0.2), seed=3).sort_index())


def test_leak_is_refused_naming_the_patient():
    table = pd.DataFrame({"patient_id": ["a", "a", "b"]})
    with pytest.raises(SplitError, match="patient a is in more than one split"):
        check_no_leakage(table, pd.Series(["train", "test", "test"]))


@pytest.mark.parametrize("ratios", [(0.5, 0.5, 0.5), (0.9, 0.2, -0.1)])
def test_bad_ratios_are_refused(table, ratios):
    with pytest.raises(SplitError, match="--split-ratios"):
        ratio_splits(table.head(10), ratios, 0)
