"""One Spark task's work without Spark: decode, embed, and what becomes an error row."""

import numpy as np
import pandas as pd
from PIL import Image

from common.data_config import DataConfig
from common.extraction import extract_frame


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
