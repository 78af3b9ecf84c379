"""One Spark task's work without Spark: decode, embed, and what becomes an error row."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.features.extraction import extract_frame


class NaNForBrightImages:
    """A stand-in backbone: a real decode path, features NaN for images brighter than mid-gray."""

    data_config = DataConfig(16)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = np.repeat(images.mean(axis=(1, 2))[:, None], 4, axis=1).astype(np.float32)
        out[images.mean(axis=(1, 2)) > 0.5, 1] = np.nan
        return out


def test_non_finite_features_become_error_rows_never_stored(tmp_path):
    paths = []
    for name, value in (("dark.png", 30), ("bright.png", 220), ("grey.png", 100)):
        Image.new("L", (20, 20), value).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    (tmp_path / "broken.png").write_bytes(b"nope")
    paths.append(str(tmp_path / "broken.png"))
    rows = pd.DataFrame({"image_id": [p.split("/")[-1] for p in paths], "patient_id": "p", "view": "PA", "age": 50.0,
                         "sex": 1, "labels": [[0]] * 4, "split": "train", "path": paths})
    out = extract_frame(rows, NaNForBrightImages()).set_index("image_id")
    assert out.loc["bright.png", "features"] is None and "non-finite features: 1 NaN/Inf" in out.loc["bright.png", "error"]
    assert out.loc["broken.png", "features"] is None and out.loc["broken.png", "error"]
    for good in ("dark.png", "grey.png"):
        assert out.loc[good, "error"] is None and np.isfinite(out.loc[good, "features"]).all()


def test_a_store_failing_to_hand_over_an_image_is_not_the_images_fault(monkeypatch):
    from common import fs
    from common.images.data_config import load_input as decode

    def load(source):
        return np.zeros((4, 4), np.float32)

    # An object that is not there is the row's error; a store that does not answer raises (the chunk is not
    # committed, so the image is embedded when the store answers again).
    image, error = decode(load, "memory://nothing/here/a.png")
    assert image is None and error.startswith("FileNotFoundError: ")
    image, error = decode(load, "s3://bucket/../a.png")
    assert image is None and error.startswith("ValueError: ")

    def unreachable(path):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")

    monkeypatch.setattr(fs, "read_bytes", unreachable)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        decode(load, "memory://bucket/a.png")


def test_a_task_reports_a_failing_store_as_a_result_and_the_driver_stops_in_one_line(monkeypatch, tmp_path):
    from common import fs
    from common.features.store_writer import STORE_FAILURE, OutputError, StoreFailure, check_results, compact_group
    from jobs.extract import stopped_by_store

    def full(*args, **kwargs):
        raise OSError("No space left on device (a task)")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": ["a"], "error": ["broken"]}), tmp_path / "errors-0.parquet")
    monkeypatch.setattr(fs, "for_writing", full)
    result = compact_group(str(tmp_path), 4, {"kind": "errors", "part": 0, "files": ["errors-0.parquet"]})
    assert result["kind"] == STORE_FAILURE and "No space left on device" in result["file"]
    with pytest.raises(StoreFailure, match="No space left on device"):
        check_results([{"kind": "train", "file": "f", "rows": 1}, result])
    with pytest.raises(OutputError) as info:
        with stopped_by_store("s3://b/x", lambda: "2 of 5 chunks are committed and kept"):
            check_results([result])
    assert str(info.value) == ("--out s3://b/x: No space left on device (a task); 2 of 5 chunks are committed and kept: "
                               "run the same command again to resume")
    # Spark's report of any other task failure passes through while the store answers.
    with pytest.raises(RuntimeError, match="a bug"):
        with stopped_by_store(str(tmp_path), lambda: "none"):
            raise RuntimeError("a bug")
