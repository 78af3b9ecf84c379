"""One data config per model: its geometry, its training views, its record."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.images.data_config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, DataConfigError


def _wide(tmp_path, name="wide.png"):
    # 100 x 300, left third black, rest white.
    img = np.full((100, 300), 255, np.uint8)
    img[:, :100] = 0
    path = tmp_path / name
    Image.fromarray(img).save(path)
    return str(path)


def test_pad_keeps_the_aspect_ratio_and_cuts_nothing(tmp_path):
    out = DataConfig(30).load(_wide(tmp_path))
    assert out.shape == (30, 30)
    # The 300-wide image scales to 30 x 10, centered: rows 10..19, black above and below.
    assert (out[:10] == 0).all() and (out[20:] == 0).all()
    content = out[10:20]
    assert (content[:, :9] == 0).all() and (content[:, 11:] == 1).all()


def test_crop_takes_the_centered_square(tmp_path):
    img = np.full((100, 300), 255, np.uint8)
    img[:, :50] = 0
    img[:, 250:] = 0
    path = tmp_path / "edges.png"
    Image.fromarray(img).save(path)
    # The centered 100 x 100 square (columns 100..199) is all white; the black edges are cut.
    np.testing.assert_allclose(DataConfig(30, resize="crop").load(str(path)), 1.0)


def test_stretch_keeps_the_split_in_every_row(tmp_path):
    out = DataConfig(30, resize="stretch").load(_wide(tmp_path))
    assert (out[:, :9] == 0).all() and (out[:, 11:] == 1).all()
    np.testing.assert_array_equal(out, np.broadcast_to(out[0], out.shape))


def test_square_image_is_the_same_under_pad_and_stretch(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "sq.png"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    np.testing.assert_array_equal(DataConfig(32).load(str(path)), DataConfig(32, resize="stretch").load(str(path)))


@pytest.mark.parametrize("resize", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("crop_pct", [1.0, 0.8])
def test_placement_says_where_load_puts_a_point(tmp_path, resize, crop_pct):
    # A bright 8 x 8 block in a 120 x 200 image: its center must land where placement says.
    img = np.zeros((120, 200), np.uint8)
    img[60:68, 120:128] = 255
    path = tmp_path / "dot.png"
    Image.fromarray(img).save(path)
    cfg = DataConfig(40, resize=resize, crop_pct=crop_pct)
    out = cfg.load(str(path))
    ys, xs = np.nonzero(out > 0)
    weights = out[ys, xs]
    got = (np.average(xs + 0.5, weights=weights), np.average(ys + 0.5, weights=weights))
    want = cfg.placement(200, 120).to_input(np.array(124.0), np.array(64.0))
    assert got == pytest.approx((float(want[0]), float(want[1])), abs=0.5)


def test_train_view_is_the_eval_input_shifted_and_flipped():
    cfg = DataConfig(32)
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    views = [cfg.train_view(image, np.random.default_rng(s)) for s in range(20)]
    shift = round(32 * cfg.train_shift)
    padded = np.pad(image, shift)
    for view in views:
        # Each view is a window of the padded eval input, possibly mirrored: never a rescaled one.
        found = any(
            np.array_equal(candidate, padded[t:t + 32, l:l + 32])
            for candidate in (view, view[:, ::-1])
            for t in range(2 * shift + 1) for l in range(2 * shift + 1)
        )
        assert found
    assert len({v.tobytes() for v in views}) > 10  # the views differ
    np.testing.assert_array_equal(cfg.train_view(image, np.random.default_rng(3)),
                                  cfg.train_view(image, np.random.default_rng(3)))
    plain = DataConfig(32, train_shift=0.0, train_flip=False)
    np.testing.assert_array_equal(plain.train_view(image, np.random.default_rng(1)), image)


def test_to_tensor_normalizes_each_channel():
    cfg = DataConfig(8)
    batch = np.full((2, 8, 8), 0.5, np.float32)
    batch[1] = 0.0
    x = cfg.to_tensor(batch)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        assert torch.allclose(x[0, c], torch.full((8, 8), (0.5 - m) / s))
        assert torch.allclose(x[1, c], torch.full((8, 8), -m / s))
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        cfg.to_tensor(np.zeros((2, 5, 5), np.float32))


def test_record_round_trips_through_json():
    cfg = DataConfig(320, resize="crop", crop_pct=0.9, interpolation="bicubic")
    back = DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), "x")
    assert back == cfg and hash(back) == hash(cfg)
    assert "320 px" in cfg.describe() and "center crop 0.9" in cfg.describe()


@pytest.mark.parametrize("change, message", [
    ({"resize": "zoom"}, "resize 'zoom'"),
    ({"input_size": 2}, "input_size 2"),
    ({"colour": "sepia"}, "unknown field"),
    ({"value_scaling": "z-score"}, "value_scaling"),
    ({"crop_pct": 1.5}, "crop_pct"),
])
def test_a_bad_record_is_one_line_naming_its_source(change, message):
    record = {**DataConfig(224).to_dict(), **change}
    with pytest.raises(DataConfigError, match=message) as err:
        DataConfig.from_dict(record, "stores/x/manifest.json")
    assert str(err.value).startswith("stores/x/manifest.json") and "\n" not in str(err.value)


def test_overrides_change_only_what_was_given():
    cfg = DataConfig(224, resize="crop")
    assert cfg.with_overrides() is cfg
    assert cfg.with_overrides(input_size=320) == DataConfig(320, resize="crop")
    assert cfg.with_overrides(resize="pad") == DataConfig(224)


def test_one_decode_for_two_inputs_keeps_the_first_exactly_as_load_gives_it(tmp_path):
    # A JPEG is decoded at a DCT-reduced scale that depends on the side asked for: the backbone's input of a
    # masked store must still be what its plain store gets (one model, one preprocessing).
    rng = np.random.default_rng(0)
    path = tmp_path / "film.jpg"
    Image.fromarray(rng.integers(0, 256, (1024, 900), dtype=np.uint8)).save(path, quality=90)
    small, large = DataConfig(64), DataConfig(256)
    backbone, lungs = small.load_with(large, str(path))
    np.testing.assert_array_equal(backbone, small.load(str(path)))
    assert lungs.shape == (256, 256)
