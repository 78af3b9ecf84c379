"""Reading and fusing stores, their refusals, label choice and policies, and inputs."""

import json

import numpy as np
import pytest

from common.data.labels import CHEXPERT_COMPETITION, CHEXPERT_LABELS, NIH_LABELS
from common.features.store import StoreError
from common.data.targets import LabelError, apply_policy, select_labels
from heads.data import demographics, fit_inputs, make_inputs, open_stores
from tests.heads_fixtures import synthetic_rows, write_store

SIZES = {"train": 40, "val": 20, "test": 20}


def make_splits(dim, seed=0, sizes=SIZES, n_labels=len(NIH_LABELS)):
    rng = np.random.default_rng(seed)
    return {s: synthetic_rows(n, dim, n_labels, rng, prefix=s) for s, n in sizes.items()}


def with_features(splits, dim, seed):
    """The same images and labels with other features: a second backbone's store."""
    rng = np.random.default_rng(seed)
    return {s: {**rows, "features": rng.standard_normal((len(rows["image_id"]), dim)).astype(np.float32)}
            for s, rows in splits.items()}


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_single_store_reads_sorted_contiguous_arrays(tmp_path):
    splits = make_splits(8)
    store = write_store(tmp_path / "a", splits, files_per_split=3)
    data = open_stores([str(store)])
    assert list(data.splits) == ["train", "val", "test"]
    train = data.splits["train"]
    assert train.features.dtype == np.float32 and train.features.flags.c_contiguous
    assert list(train.image_id) == sorted(splits["train"]["image_id"])
    np.testing.assert_array_equal(train.features, splits["train"]["features"])  # ids were written in order
    assert data.feature_dims == [8] and data.dataset == "nih" and len(data.infos[0].sha256) == 64


def test_two_stores_fuse_column_wise(tmp_path):
    splits = make_splits(8)
    a = write_store(tmp_path / "a", splits)
    b = write_store(tmp_path / "b", with_features(splits, 4, 1), backbone="densenet121")
    data = open_stores([str(a), str(b)], splits=["train", "val"])
    fused = data.splits["val"]
    assert fused.features.shape == (20, 12) and data.feature_dims == [8, 4]
    np.testing.assert_array_equal(fused.features[:, :8], splits["val"]["features"])
    np.testing.assert_array_equal(fused.features[:, 8:], with_features(splits, 4, 1)["val"]["features"])


def test_fusion_refuses_different_images(tmp_path):
    splits = make_splits(8)
    other = with_features(splits, 4, 1)
    other["val"] = {k: v[:-1] for k, v in other["val"].items()}  # one image fewer in val
    a, b = write_store(tmp_path / "a", splits), write_store(tmp_path / "b", other)
    with pytest.raises(StoreError) as err:
        open_stores([str(a), str(b)])
    assert "split=val image_ids differ" in one_line(err) and "val_00019.png" in str(err.value)


def test_fusion_refuses_different_splits_labels_and_label_names(tmp_path):
    splits = make_splits(8)
    a = write_store(tmp_path / "a", splits)
    no_test = write_store(tmp_path / "b", {k: v for k, v in with_features(splits, 4, 1).items() if k != "test"})
    with pytest.raises(StoreError) as err:
        open_stores([str(a), str(no_test)])
    assert "need the same" in one_line(err)

    relabeled = with_features(splits, 4, 1)
    relabeled["train"] = {**relabeled["train"], "labels": 1 - relabeled["train"]["labels"]}
    c = write_store(tmp_path / "c", relabeled)
    with pytest.raises(StoreError) as err:
        open_stores([str(a), str(c)])
    assert "labels differ" in one_line(err)

    d = write_store(tmp_path / "d", with_features(splits, 4, 1), label_names=[f"L{i}" for i in range(14)])
    with pytest.raises(StoreError) as err:
        open_stores([str(a), str(d)])
    assert "label_names differ" in one_line(err)

    with pytest.raises(StoreError, match="given twice"):
        open_stores([str(a), str(a)])


def test_refuses_missing_manifest_unknown_version_and_wrong_width(tmp_path):
    splits = make_splits(8)
    with pytest.raises(StoreError, match="no manifest.json"):
        open_stores([str(tmp_path)])
    bad = write_store(tmp_path / "v", splits)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format_version 99"):
        open_stores([str(bad)])
    wide = write_store(tmp_path / "w", splits, manifest_extra={"feature_dim": 9})
    with pytest.raises(StoreError) as err:
        open_stores([str(wide)])
    assert "manifest says 9" in one_line(err)
    with pytest.raises(StoreError, match="no split=holdout"):
        open_stores([str(wide)], splits=["holdout"])


def test_policies_for_uncertain_labels():
    labels = np.array([[1, 0, -1], [-1, -1, 0]], dtype=np.int8)
    y, m = apply_policy(labels, "ignore")
    assert y.tolist() == [[1, 0, 0], [0, 0, 0]] and m.tolist() == [[True, True, False], [False, False, True]]
    y, m = apply_policy(labels, "zeros")
    assert y.tolist() == [[1, 0, 0], [0, 0, 0]] and m.all()
    y, m = apply_policy(labels, "ones")
    assert y.tolist() == [[1, 0, 1], [1, 1, 0]] and m.all()
    y, m = apply_policy(labels, "multiclass")  # class indices: 0 negative, 1 uncertain, 2 positive
    assert y.tolist() == [[2, 0, 1], [1, 1, 0]] and m.all()
    y, m = apply_policy(labels, "selftrained")  # starts as U-Ignore
    assert y.tolist() == [[1, 0, 0], [0, 0, 0]] and m.tolist() == [[True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="--policy"):
        apply_policy(labels, "twice")


def test_label_subsets():
    assert select_labels(CHEXPERT_LABELS, "competition") == list(CHEXPERT_COMPETITION)
    assert "No Finding" not in select_labels(CHEXPERT_LABELS, "all")
    assert select_labels(CHEXPERT_LABELS, "all", drop_no_finding=False)[0] == "No Finding"
    assert select_labels(NIH_LABELS, "Mass, Hernia") == ["Mass", "Hernia"]
    with pytest.raises(LabelError, match="'Pleural Effusion' is not a label"):
        select_labels(NIH_LABELS, "competition")


def test_demographics_encodings():
    age = np.array([50.0, np.nan, 20.0], dtype=np.float32)
    sex = np.array([1.0, 0.0, np.nan], dtype=np.float32)
    ind = demographics(age, sex, "indicator", age_fill=40.0)
    np.testing.assert_allclose(ind, [[0.5, 1.0], [0.4, 0.0], [0.2, 0.5]], rtol=1e-6)
    hot = demographics(age, sex, "onehot", age_fill=40.0)
    np.testing.assert_allclose(hot, [[0.5, 1, 0], [0.4, 0, 1], [0.2, 0, 0]], rtol=1e-6)


def test_resnet50_input_with_age_and_sex_is_2050_wide(tmp_path):
    store = write_store(tmp_path / "a", make_splits(2048, sizes={"train": 6, "val": 3}))
    data = open_stores([str(store)])
    spec = fit_inputs(data.splits["train"], data.feature_dims, age_sex=True)
    assert spec.width == 2050


def test_standardization_is_fitted_on_train_only(tmp_path):
    splits = make_splits(6)
    splits["val"]["features"] = splits["val"]["features"] * 3 + 10  # a shifted split must stay shifted
    data = open_stores([str(write_store(tmp_path / "a", splits))])
    train, val = data.splits["train"], data.splits["val"]
    spec = fit_inputs(train, data.feature_dims, age_sex=True, sex_encoding="onehot")
    x_train = make_inputs(train.features, train.age, train.sex, spec)
    x_val = make_inputs(val.features, val.age, val.sex, spec)
    assert x_train.shape == (40, 9)
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(spec.mean[:6], train.features.mean(0), rtol=1e-5, atol=1e-6)
    assert x_val[:, :6].mean() > 5  # val statistics did not leak into the fit
    assert not np.isnan(x_val).any()  # unknown age/sex filled, not NaN
    np.testing.assert_array_equal(train.features, splits["train"]["features"])  # store arrays untouched


def test_nan_or_inf_features_are_refused_naming_the_first_row(tmp_path):
    splits = make_splits(8)
    splits["val"]["features"][[3, 7], 2] = [np.nan, np.inf]
    store = write_store(tmp_path / "nan", splits)
    with pytest.raises(StoreError) as err:
        open_stores([str(store)])
    assert "2 rows have NaN or Inf features, first 'val_00003.png'" in one_line(err)
