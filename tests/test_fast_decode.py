"""PNGs decoded by OpenCV (common.images.decode.FAST_PNG) give Pillow's exact model inputs, in every PNG mode;
broken and oversize files are refused as with Pillow alone."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common.images import decode as images
from common.images.data_config import DataConfig
from tests.data_paths import NIH_IMAGES

needs_cv2 = pytest.mark.skipif(images.cv2 is None, reason="opencv-python-headless not installed")
CONFIGS = (DataConfig(32), DataConfig(40, resize="crop", crop_pct=0.875, interpolation="bicubic"),
           DataConfig(24, resize="stretch"))


@pytest.fixture
def used(monkeypatch):
    """Counts the PNGs OpenCV decoded (its helper returned an image) and those it left to Pillow."""
    counts = {"opencv": 0, "pillow": 0}
    helper = images._png_with_opencv

    def spy(img):
        out = helper(img)
        counts["opencv" if out is not None else "pillow"] += 1
        return out

    monkeypatch.setattr(images, "_png_with_opencv", spy)
    return counts


def _both(path, monkeypatch, configs=CONFIGS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fast, Pillow) DataConfig.load results of `path` for each config."""
    out = []
    for config in configs:
        monkeypatch.setattr(images, "FAST_PNG", True)
        fast = config.load(str(path))
        monkeypatch.setattr(images, "FAST_PNG", False)
        out.append((fast, config.load(str(path))))
    monkeypatch.setattr(images, "FAST_PNG", True)
    return out


def _gray(h=61, w=97) -> np.ndarray:
    """A non-square gray image with gradients, edges and noise (every rounding path gets exercised)."""
    y, x = np.mgrid[:h, :w]
    noise = np.random.default_rng(0).integers(0, 40, (h, w))
    return ((x * 255 // (w - 1) + (y // 8 % 2) * 60 + noise) % 256).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _handmade_png(pixels: np.ndarray, bit_depth: int, colour_type: int, interlace: bool) -> bytes:
    """A PNG Pillow cannot write: Adam7-interlaced, or 2/4-bit gray. Filter 0 on every row."""
    h, w = pixels.shape[:2]
    passes = ([(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]
              if interlace else [(0, 0, 1, 1)])  # (y0, x0, dy, dx)
    raw = b""
    for y0, x0, dy, dx in passes:
        sub = pixels[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        for row in sub:
            if bit_depth < 8:
                per = 8 // bit_depth
                padded = np.zeros(-(-len(row) // per) * per, np.uint8)
                padded[:len(row)] = row
                groups = padded.reshape(-1, per).astype(np.uint16)
                shifts = np.arange(per - 1, -1, -1) * bit_depth
                data = (groups << shifts).sum(axis=1).astype(np.uint8).tobytes()
            else:
                data = row.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
            raw += b"\x00" + data
    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _variants() -> dict[str, Image.Image]:
    gray = _gray()
    base = Image.fromarray(gray)
    rgb = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], axis=-1)
    palette = Image.frombytes("P", base.size, gray.tobytes())
    palette.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, 255 - i)])
    with_alpha = palette.copy()
    with_alpha.info["transparency"] = 5
    four = Image.frombytes("P", base.size, (gray // 64).tobytes())  # 4 colours: Pillow writes a 2-bit palette
    four.putpalette([0, 0, 0, 90, 20, 200, 255, 255, 0, 10, 240, 100])
    gray_trns = base.copy()
    gray_trns.info["transparency"] = 7
    return {
        "l.png": base,
        "l-trns.png": gray_trns,
        "i16.png": Image.fromarray(gray.astype(np.uint16) * 251 + 3),
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, gray[::-1]])),
        "p.png": palette,
        "p-trns.png": with_alpha,
        "p-2bit.png": four,
        "la.png": Image.merge("LA", (base, Image.fromarray(255 - gray))),
        "1.png": base.convert("1"),
    }


@needs_cv2
@pytest.mark.parametrize("name", list(_variants()))
def test_every_png_mode_is_bit_exact(name, tmp_path, monkeypatch, used):
    path = tmp_path / name
    _variants()[name].save(path)
    for fast, pillow in _both(path, monkeypatch):
        np.testing.assert_array_equal(fast, pillow, err_msg=name)
    assert used == {"opencv": len(CONFIGS), "pillow": 0}, name  # OpenCV did decode it


@needs_cv2
@pytest.mark.parametrize("name, bit_depth, colour_type, interlace", [
    ("gray8-interlaced.png", 8, 0, True), ("rgb-interlaced.png", 8, 2, True), ("gray16-interlaced.png", 16, 0, True),
    ("gray2.png", 2, 0, False), ("gray4-interlaced.png", 4, 0, True),
])
def test_handmade_pngs_are_bit_exact(name, bit_depth, colour_type, interlace, tmp_path, monkeypatch, used):
    gray = _gray(37, 45)
    pixels = {8: gray, 16: gray.astype(np.uint16) * 257 + 1, 2: gray >> 6, 4: gray >> 4}[bit_depth]
    if colour_type == 2:
        pixels = np.stack([gray, gray[::-1], 255 - gray], axis=-1)
    path = tmp_path / name
    path.write_bytes(_handmade_png(pixels, bit_depth, colour_type, interlace))
    with Image.open(path) as img:
        assert img.size == (45, 37) and img.info.get("interlace", 0) == int(interlace)
    for fast, pillow in _both(path, monkeypatch):
        np.testing.assert_array_equal(fast, pillow, err_msg=name)
    assert used == {"opencv": len(CONFIGS), "pillow": 0}, name


@needs_cv2
def test_sixteen_bit_colour_is_left_to_pillow(tmp_path, monkeypatch, used):
    # Pillow reads 16-bit RGB as 8-bit RGB; such files keep going through Pillow only.
    path = tmp_path / "rgb16.png"
    path.write_bytes(_handmade_png(np.dstack([_gray().astype(np.uint16) * 257] * 3), 16, 2, False))
    for fast, pillow in _both(path, monkeypatch, CONFIGS[:1]):
        np.testing.assert_array_equal(fast, pillow)
    assert used == {"opencv": 0, "pillow": 1}


@needs_cv2
@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason=f"{NIH_IMAGES} not present")
def test_real_nih_images_are_bit_exact(monkeypatch, used):
    paths = sorted(NIH_IMAGES.glob("*.png"))
    chosen = paths[:3]
    for path in paths:  # one of the few RGBA files (with a gAMA chunk), too
        with Image.open(path) as img:
            if img.mode == "RGBA":
                chosen.append(path)
                break
    for path in chosen:
        for fast, pillow in _both(path, monkeypatch, (DataConfig(224), DataConfig(320, interpolation="bicubic"))):
            np.testing.assert_array_equal(fast, pillow, err_msg=path.name)
    assert used == {"opencv": 2 * len(chosen), "pillow": 0}


@pytest.mark.parametrize("fast", [True, False])
def test_truncated_and_corrupt_pngs_raise_naming_the_file(fast, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "FAST_PNG", fast and images.cv2 is not None)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    for name, content in (("half.png", data[: len(data) // 2]), ("tail.png", data[:-200]),
                          ("flipped.png", bytes(corrupt))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises((ValueError, OSError)) as caught:
            DataConfig(32).load(str(path))
        assert name in str(caught.value) and "\n" not in str(caught.value), name


def test_oversize_header_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("L", (400, 300)).save(path)
    calls = []
    if images.cv2 is not None:
        monkeypatch.setattr(images, "_png_with_opencv", lambda img: calls.append(img) or None)
    with pytest.raises(ValueError, match=r"wide\.png: 400 x 300 = 0 Mpixel, more than the limit of 0.1 Mpixel"):
        DataConfig(32).load(str(path), max_pixels=100_000)
    assert not calls  # neither decoder ran


@needs_cv2
def test_bytesio_input(tmp_path, monkeypatch, used):
    path = tmp_path / "upload.png"
    _variants()["rgba.png"].save(path)
    stream = io.BytesIO(path.read_bytes())  # as the service hands an upload over
    stream.name = "upload.png"
    out = DataConfig(32).load(stream)
    monkeypatch.setattr(images, "FAST_PNG", False)
    np.testing.assert_array_equal(out, DataConfig(32).load(str(path)))
    assert used["opencv"] == 1
    with pytest.raises(OSError, match="broken.png"):
        broken = io.BytesIO(path.read_bytes()[:300])
        broken.name = "broken.png"
        monkeypatch.setattr(images, "FAST_PNG", True)
        DataConfig(32).load(broken)


def test_opencv_is_used_when_installed_on_one_thread():
    assert images.FAST_PNG is (images.cv2 is not None)
    if images.cv2 is not None:
        assert images.cv2.getNumThreads() == 1
