import pandas as pd
import pytest

from common.data.nih import read_nih
from common.data.splits import SplitError, assign_groups, check_no_leakage, official_splits, ratio_splits, read_list
from tests.data_paths import NIH, NIH_CSV, needs_shared


@pytest.fixture(scope="module")
def table():
    return read_nih(NIH_CSV).table


def official(table, seed=0):
    return official_splits(table, NIH / "train_val_list.txt", NIH / "test_list.txt", 0.1, seed)


def patients_per_split(table, split):
    return {s: set(table.loc[split == s, "patient_id"]) for s in ("train", "val", "test")}


@needs_shared
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


@needs_shared
def test_official_val_carve_out_is_seeded(table):
    assert official(table, seed=0).equals(official(table, seed=0))
    assert not official(table, seed=0).equals(official(table, seed=1))


@needs_shared
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


@needs_shared
@pytest.mark.parametrize("ratios", [(0.5, 0.5, 0.5), (0.9, 0.2, -0.1)])
def test_bad_ratios_are_refused(table, ratios):
    with pytest.raises(SplitError, match="--split-ratios"):
        ratio_splits(table.head(10), ratios, 0)


def test_ratio_splits_keep_the_assignment_feature_stores_recorded():
    # Stores record their split: the same patients and seed must keep giving this assignment.
    table = pd.DataFrame({"patient_id": [f"p{i}" for i in range(10)] * 2})
    assert dict(zip(table["patient_id"], ratio_splits(table, (0.6, 0.2, 0.2), seed=0))) == {
        "p4": "train", "p6": "train", "p2": "train", "p7": "train", "p3": "train", "p5": "train",
        "p9": "val", "p0": "val", "p8": "test", "p1": "test"}


def test_shares_that_round_past_the_whole_leave_test_the_rest():
    # round(1.5) + round(1.5) groups of 3: val gets what train leaves instead of a longer list than the patients.
    table = pd.DataFrame({"patient_id": ["a", "b", "c"]})
    assert sorted(ratio_splits(table, (0.5, 0.5, 0.0), seed=0).tolist()) == ["train", "train", "val"]


def test_the_flag_is_named_in_the_error():
    with pytest.raises(SplitError, match=r"^--split \[0.5, 0.5\]: give three non-negative fractions that sum to 1$"):
        assign_groups(["a"], [0.5, 0.5], seed=0, flag="--split")
