"""Decoding, on real NIH images and copies of them in other formats (geometry: test_data_config.py)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.images.decode import read_gray
from tests.data_paths import NIH_IMAGES

SIZE = 224


def load_image(path: str, size: int) -> np.ndarray:
    # These files are square or their geometry does not matter here: decoding is what is tested.
    return DataConfig(size, resize="stretch").load(path)

pytestmark = pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason=f"{NIH_IMAGES} not present")


def _first_with_mode(mode: str) -> Path:
    for path in sorted(NIH_IMAGES.glob("*.png")):
        with Image.open(path) as img:
            if img.mode == mode:
                return path
    pytest.skip(f"no {mode} image in {NIH_IMAGES}")


@pytest.fixture(scope="module")
def gray_path() -> Path:
    return _first_with_mode("L")


@pytest.fixture(scope="module")
def gray(gray_path) -> np.ndarray:
    with Image.open(gray_path) as img:
        return np.asarray(img.convert("L"))


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_gray_decodes_to_unit_range(gray_path):
    out = load_image(str(gray_path), SIZE)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # A real X-ray uses much of the range: a /65535 mix-up would leave it all near 0.
    assert out.max() > 0.5 and out.std() > 0.05


def test_png_variants_decode_alike(gray, tmp_path):
    base = Image.fromarray(gray)
    ref = load_image(str(_save(base, tmp_path / "l.png")), SIZE)

    palette = Image.frombytes("P", base.size, gray.tobytes())
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    variants = {
        "rgb.png": base.convert("RGB"),
        "rgba.png": base.convert("RGBA"),
        "la.png": Image.merge("LA", (base, Image.new("L", base.size, 128))),
        "p.png": palette,
        "i16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        # Pillow opens a 32-bit integer TIFF as mode 'I'.
        "i32.tif": Image.fromarray(gray.astype(np.int32) * 257),
    }
    for name, img in variants.items():
        path = _save(img, tmp_path / name)
        out = load_image(str(path), SIZE)
        np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0, err_msg=name)


def test_sixteen_bit_uses_full_range(tmp_path):
    full = np.full((40, 30), 65535, np.uint16)
    full[:, :15] = 0
    out = load_image(str(_save(Image.fromarray(full), tmp_path / "full.png")), 8)
    assert out.max() == 1.0 and out.min() == 0.0


def test_one_bit_is_black_and_white(tmp_path):
    bits = np.zeros((64, 64), bool)
    bits[:, 32:] = True
    binary = Image.fromarray(bits)
    assert binary.mode == "1"
    out = load_image(str(_save(binary, tmp_path / "bw.png")), 16)
    assert (out[:, :7] == 0).all() and (out[:, 9:] == 1).all()


def test_jpeg_close_to_png(gray, tmp_path):
    base = Image.fromarray(gray)
    ref = load_image(str(_save(base, tmp_path / "l.png")), SIZE)
    for name, img in (("gray.jpg", base), ("rgb.jpg", base.convert("RGB"))):
        out = load_image(str(_save(img, tmp_path / name, quality=95)), SIZE)
        assert out.shape == (SIZE, SIZE) and out.dtype == np.float32
        # Lossy coding plus draft's DCT-domain downscale: close on average, not bit-equal.
        assert np.abs(out - ref).mean() < 0.005, name


def test_stretches_without_crop(tmp_path):
    # Left third black, rest white, in a wide image: a stretch keeps the 1:2 split in every row.
    img = np.full((100, 300), 255, np.uint8)
    img[:, :100] = 0
    out = load_image(str(_save(Image.fromarray(img), tmp_path / "wide.png")), 30)
    assert out.shape == (30, 30)
    assert (out[:, :9] == 0).all() and (out[:, 11:] == 1).all()
    np.testing.assert_array_equal(out, np.broadcast_to(out[0], out.shape))


def test_real_rgba_file_decodes():
    path = _first_with_mode("RGBA")
    out = load_image(str(path), SIZE)
    with Image.open(path) as img:
        assert img.getextrema()[3] == (255, 255)  # opaque, so alpha carries nothing
        ref_img = img.convert("L")
    ref = np.asarray(ref_img.convert("F").resize((SIZE, SIZE), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_broken_files_raise(gray_path, tmp_path):
    data = gray_path.read_bytes()
    half = tmp_path / "half.png"
    half.write_bytes(data[: len(data) // 2])
    # An interrupted copy: only the last rows' compressed data is missing.
    tail = tmp_path / "tail.png"
    tail.write_bytes(data[:-1000])
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    for path in (half, tail, text, tmp_path / "missing.png"):
        with pytest.raises(Exception):
            load_image(str(path), SIZE)


def test_out_of_range_32_bit_raises(tmp_path):
    path = _save(Image.fromarray(np.full((8, 8), 70000, np.int32)), tmp_path / "big.tif")
    with pytest.raises(ValueError, match="big.tif"):
        load_image(str(path), 8)


def test_read_gray_gives_exactly_the_size_asked(gray_path):
    out = read_gray(str(gray_path), (300, 200))
    assert out.shape == (200, 300) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the header is all we read
def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    # 13000 x 13000 passes Pillow's bomb check yet would decode to ~0.8 GB in float mode.
    path = tmp_path / "huge.png"
    Image.new("L", (13000, 13000)).save(path, optimize=False)
    with pytest.raises(ValueError, match=r"huge\.png: 13000 x 13000 = 169 Mpixel, more than the limit of 50 Mpixel"):
        load_image(str(path), 32)
    small = tmp_path / "small.png"
    Image.new("L", (20, 10)).save(small)
    assert DataConfig(8).load(str(small), max_pixels=200).shape == (8, 8)  # the limit is configurable
    with pytest.raises(ValueError, match="limit of 0.000199 Mpixel"):
        DataConfig(8).load(str(small), max_pixels=199)


def test_only_the_documented_formats_are_opened(gray, tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))  # never run on an upload
    eps = tmp_path / "scan.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 setgray 0 0 64 64 rectfill\nshowpage\n%%EOF\n")
    small = Image.fromarray(gray[:64, :64])
    gif, ppm = _save(small, tmp_path / "scan.gif"), _save(small, tmp_path / "scan.ppm")
    gif_as_png = tmp_path / "gif.png"
    gif_as_png.write_bytes(gif.read_bytes())
    for path in (eps, gif, ppm, gif_as_png):
        with pytest.raises(ValueError) as info:
            load_image(str(path), 16)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: not a") and "PNG, JPEG, TIFF" in message, message
    assert not ran


def test_project_code_opens_images_only_through_open_image():
    # Image.open (also as PIL.Image.open) anywhere in the installed packages but common.images.decode.open_image
    # would accept every format Pillow knows again.
    import ast

    root = Path(__file__).resolve().parents[1]
    bypasses = []
    for package in ("common", "jobs", "heads", "finetune", "cxr", "lungs", "serve"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            opens = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr == "open"
                     and "Image" in (getattr(node.func.value, "id", None), getattr(node.func.value, "attr", None))]
            home = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                    and node.name == "open_image" and path == root / "common" / "images" / "decode.py"]
            bypasses += [f"{path.relative_to(root)}:{line}" for line in opens
                         if not any(f.lineno <= line <= f.end_lineno for f in home)]
    assert not bypasses, bypasses


def test_a_header_past_pillows_bomb_limit_is_one_line_naming_the_file(tmp_path):
    import struct
    import zlib

    path = _save(Image.new("L", (8, 8)), tmp_path / "claims.png")
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 20000, 20000) + bytes(data[24:29])  # 400 Mpixel claimed by 90 bytes
    data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        load_image(str(path), 8)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and "decompression bomb" in message, message
