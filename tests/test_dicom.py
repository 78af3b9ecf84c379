"""DICOM decoding: files written here with pydicom from real NIH PNGs, read back through DataConfig.load."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.images.data_config import DataConfig
from common.images.dicom import MultiFrameWarning, decode_dicom
from common.images.decode import decode_gray
from tests.data_paths import NIH_IMAGES, needs_shared

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage  # noqa: E402

pytestmark = needs_shared
SIZE = 224


def load(path) -> np.ndarray:
    return DataConfig(SIZE).load(str(path))


@pytest.fixture(scope="module")
def png_path() -> Path:
    for path in sorted(NIH_IMAGES.glob("*.png")):
        with Image.open(path) as img:
            if img.mode == "L":
                return path
    pytest.skip(f"no 8-bit gray PNG in {NIH_IMAGES}")


@pytest.fixture(scope="module")
def gray(png_path) -> np.ndarray:
    with Image.open(png_path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def png_input(png_path) -> np.ndarray:
    return load(png_path)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None,
                preamble: bool = True, syntax: str | None = None, **tags) -> Path:
    """A minimal DX-like file: only what a reader needs, no personal data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    for name, value in tags.items():
        setattr(ds, name, value)
    if syntax is not None:
        ds.compress(syntax)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare implicit-VR dataset, as old modalities and some tools write
        ds.file_meta = FileMetaDataset()
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return path


def test_monochrome2_8bit_equals_png(tmp_path, gray, png_input):
    out = load(write_dicom(tmp_path / "m2.dcm", gray))
    np.testing.assert_allclose(out, png_input, atol=1e-6, rtol=0)
    # The full-size values are the PNG's own, on the PNG's /255 scale.
    values, scale = decode_dicom(str(tmp_path / "m2.dcm"), 10**8)
    assert scale == 1 / 255 and np.array_equal(values, gray.astype(np.float32))


def test_detected_by_content_and_bare_dataset_by_name(tmp_path, gray, png_input):
    # A DICOM file named otherwise is found by its 'DICM' marker ...
    named_png = write_dicom(tmp_path / "m2.dcm", gray).rename(tmp_path / "image.png")
    np.testing.assert_allclose(load(named_png), png_input, atol=1e-6, rtol=0)
    # ... and a bare dataset (no preamble, no file meta) is read when named .dcm.
    bare = write_dicom(tmp_path / "bare.dcm", gray, preamble=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(load(bare), png_input, atol=1e-6, rtol=0)


def test_monochrome1_is_inverted(tmp_path, gray, png_input):
    # The same picture stored MONOCHROME1 (minimum white) holds 255 - v and must read back as v.
    out = load(write_dicom(tmp_path / "m1.dcm", 255 - gray, "MONOCHROME1"))
    np.testing.assert_allclose(out, png_input, atol=1e-6, rtol=0)
    # And MONOCHROME1 of the same stored values is 1 - MONOCHROME2.
    np.testing.assert_allclose(load(write_dicom(tmp_path / "m1b.dcm", gray, "MONOCHROME1")), 1 - png_input,
                               atol=1e-6, rtol=0)


def test_presentation_lut_shape_inverse_is_one_inversion(tmp_path, gray, png_input):
    # MONOCHROME2 shown through an INVERSE Presentation LUT (some CR producers) reads back inverted ...
    out = load(write_dicom(tmp_path / "m2i.dcm", 255 - gray, PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(out, png_input, atol=1e-6, rtol=0)
    # ... and a DX file's MONOCHROME1 with INVERSE (the pair the DX module requires) is inverted once, not twice.
    out = load(write_dicom(tmp_path / "m1i.dcm", 255 - gray, "MONOCHROME1", PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(out, png_input, atol=1e-6, rtol=0)
    out = load(write_dicom(tmp_path / "m2id.dcm", gray, PresentationLUTShape="IDENTITY"))
    np.testing.assert_allclose(out, png_input, atol=1e-6, rtol=0)


def test_twelve_bit_with_rescale_maps_by_stored_range(tmp_path, gray, png_input):
    stored = gray.astype(np.uint16) * 16  # 0..4080 of 4095
    out = load(write_dicom(tmp_path / "b12.dcm", stored, bits=12, RescaleSlope="0.5", RescaleIntercept="-1024"))
    # Rescale is affine: without a window it leaves values/4095.
    np.testing.assert_allclose(out, png_input * (4080 / 4095), atol=1e-6, rtol=0)
    assert decode_dicom(str(tmp_path / "b12.dcm"), 10**8)[1] == pytest.approx(1 / (4095 * 0.5))


def test_window_after_rescale_clips(tmp_path, gray):
    stored = gray.astype(np.uint16) * 16
    path = write_dicom(tmp_path / "win.dcm", stored, bits=12, RescaleSlope="0.5", RescaleIntercept="-1024",
                       WindowCenter=["-700", "0"], WindowWidth=["400", "2000"])  # the first window is used
    values, scale = decode_dicom(str(path), 10**8)
    modality = stored * 0.5 - 1024
    low, high = -700 - 0.5 - 399 / 2, -700 - 0.5 + 399 / 2
    expected = np.clip((modality - (-700.5)) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(values * scale, expected, atol=1e-6)
    assert (values * scale)[modality <= low].max() == 0 and (values * scale)[modality > high].min() == 1
    assert ((modality <= low) | (modality > high)).mean() > 0.2  # the window does clip this image


def test_voi_lut_sequence(tmp_path, gray):
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 16])
    item.add_new("LUTData", "US", [min(4 * i, 1000) for i in range(256)])  # 16-bit entries holding 0..1000
    path = write_dicom(tmp_path / "lut.dcm", gray, VOILUTSequence=[item])
    values, scale = decode_dicom(str(path), 10**8)
    np.testing.assert_allclose(values * scale, np.minimum(4 * gray.astype(np.int64), 1000) / 1000, atol=1e-6)


def test_rgb_is_pillow_gray(tmp_path, gray, png_input):
    rgb = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], axis=-1)
    out = load(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_allclose(out, load(tmp_path / "rgb.png"), atol=1e-6, rtol=0)
    # A gray picture stored as RGB is the gray picture.
    np.testing.assert_allclose(load(write_dicom(tmp_path / "rgb_gray.dcm", np.repeat(gray[..., None], 3, -1), "RGB")),
                               png_input, atol=1e-6, rtol=0)


def test_ybr_full_is_gray_of_its_rgb(tmp_path, gray):
    from pydicom.pixels import convert_color_space

    rgb = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], axis=-1)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    values, scale = decode_dicom(str(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL")), 10**8)
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float32)
    assert scale == 1 / 255 and np.abs(values - expected).max() <= 2  # two 8-bit colour conversions round


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda s: s.name)
def test_lossless_compression_decodes_identical(tmp_path, gray, syntax):
    from pydicom.pixels import get_encoder

    if not get_encoder(syntax).is_available:
        pytest.skip(f"no encoder installed for {syntax.name}")
    stored = gray.astype(np.uint16) * 16
    plain = decode_dicom(str(write_dicom(tmp_path / "plain.dcm", stored, bits=12)), 10**8)
    packed = tmp_path / "packed.dcm"
    write_dicom(packed, stored, bits=12, syntax=syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    values, scale = decode_dicom(str(packed), 10**8)
    assert scale == plain[1] and np.array_equal(values, plain[0])


PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # written by other toolkits


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_other_toolkits_lossless_files_decode_identical(tmp_path, name):
    # Signed 16-bit with a window; stored as MR, so re-labelled DX (pixels untouched) to pass the volume check.
    out = []
    for source in ("MR_small.dcm", name):
        if not (PYDICOM_FILES / source).is_file():
            pytest.skip(f"pydicom's test file {source} is not installed")
        ds = pydicom.dcmread(PYDICOM_FILES / source)
        ds.Modality = "DX"
        ds.save_as(tmp_path / source)
        out.append(decode_dicom(str(tmp_path / source), 10**8))
    (plain, plain_scale), (values, scale) = out
    assert scale == plain_scale and np.array_equal(values, plain) and 0 < (values * scale).mean() < 1


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEGLSNearLossless_16.dcm"])
def test_other_toolkits_lossy_files_decode(name):
    # 12-bit JPEG extended needs pylibjpeg-libjpeg (Pillow refuses it); a YBR_FULL JPEG baseline; JPEG-LS.
    if not (PYDICOM_FILES / name).is_file():
        pytest.skip(f"pydicom's test file {name} is not installed")
    values, scale = decode_dicom(str(PYDICOM_FILES / name), 10**8)
    assert values.ndim == 2 and values.min() >= 0 and values.max() * scale <= 1 and values.std() > 0


def test_multiframe_uses_first_frame(tmp_path, gray, png_input):
    frames = np.stack([gray, 255 - gray, np.zeros_like(gray)])
    path = write_dicom(tmp_path / "multi.dcm", frames)
    with pytest.warns(MultiFrameWarning, match="3 frames; the first is used"):
        out = load(path)
    np.testing.assert_allclose(out, png_input, atol=1e-6, rtol=0)


def _bad_files(tmp_path: Path, gray: np.ndarray) -> dict[str, tuple[Path, str]]:
    """name -> (file, the words its one-line error must hold)."""
    tmp_path.mkdir(exist_ok=True)
    no_pixels = Dataset()
    no_pixels.file_meta = FileMetaDataset()
    no_pixels.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    no_pixels.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()
    no_pixels.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    png_named_dcm = tmp_path / "png.dcm"
    Image.fromarray(gray).save(png_named_dcm, format="PNG")
    (tmp_path / "text.dcm").write_text("patient list, not an image\n")
    volume = write_dicom(tmp_path / "volume.dcm", np.stack([gray] * 4), SliceThickness="1.0")
    unknown_syntax = pydicom.dcmread(write_dicom(tmp_path / "syntax.dcm", gray))
    unknown_syntax.file_meta.TransferSyntaxUID = "1.2.3.4"  # no transfer syntax pydicom knows
    unknown_syntax.save_as(tmp_path / "syntax.dcm", enforce_file_format=True, implicit_vr=False, little_endian=True)
    return {
        "no pixel data": (tmp_path / "sr.dcm", "no pixel data"),
        "png named .dcm": (png_named_dcm, "not a"),
        "text named .dcm": (tmp_path / "text.dcm", "not a"),
        "CT slice": (write_dicom(tmp_path / "ct.dcm", gray, Modality="CT"), "3-D volume"),
        "multi-frame volume": (volume, "3-D volume"),
        "too large": (write_dicom(tmp_path / "large.dcm", gray), "Mpixel"),
        "unknown transfer syntax": (tmp_path / "syntax.dcm", "1.2.3.4"),
    }


def test_refusals_are_one_line_naming_the_file(tmp_path, gray):
    for name, (path, words) in _bad_files(tmp_path, gray).items():
        with pytest.raises(ValueError) as info:
            decode_gray(str(path), SIZE, max_pixels=gray.size - 1 if name == "too large" else 10**8)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: ") and words in message, (name, message)


def test_float_pixel_data_is_refused(tmp_path, gray):
    ds = pydicom.dcmread(write_dicom(tmp_path / "m2.dcm", gray))
    del ds.PixelData
    ds.FloatPixelData = gray.astype(np.float32).tobytes()
    ds.save_as(tmp_path / "float.dcm")
    with pytest.raises(ValueError, match="float pixel data has no known value range"):
        load(tmp_path / "float.dcm")


def test_bad_dicoms_are_error_rows(tmp_path, gray, png_path):
    from common.features.extraction import extract_frame
    from common.models.inference import FeatureExtractor

    bad = _bad_files(tmp_path / "bad", gray)
    good = write_dicom(tmp_path / "good.dcm", gray)
    paths = [good] + [path for path, _ in bad.values()]
    rows = pd.DataFrame({"image_id": [p.name for p in paths], "patient_id": "p", "view": "PA", "age": 50.0,
                         "sex": 0, "labels": [[0]] * len(paths), "split": "train", "path": [str(p) for p in paths]})
    extractor = FeatureExtractor("mobilenet_v3_large", None, 0, precision="fp32", threads=1)
    out = extract_frame(rows, extractor, max_pixels=gray.size - 1).set_index("image_id")
    assert out.loc["good.dcm", "error"] is not None  # the limit applies to every file, good ones included
    assert out["features"].isna().all() and out["error"].str.startswith("ValueError: ").all()
    out = extract_frame(rows, extractor).set_index("image_id")
    assert out.loc["good.dcm", "error"] is None and out.loc["good.dcm", "features"] is not None
    assert out.drop("good.dcm")["error"].str.startswith("ValueError: ").all()


def test_png_and_dicom_give_the_same_features(tmp_path, gray, png_input):
    from common.models.inference import FeatureExtractor

    extractor = FeatureExtractor("mobilenet_v3_large", None, 0, precision="fp32", threads=1)
    dicom_input = load(write_dicom(tmp_path / "m2.dcm", gray))
    png_features, dicom_features = extractor(np.stack([png_input, dicom_input]))
    np.testing.assert_allclose(dicom_features, png_features, atol=1e-5, rtol=1e-5)


def test_a_dicom_under_an_image_name_or_none_is_told_by_its_marker(tmp_path, gray, png_input):
    import io

    path = write_dicom(tmp_path / "m2.dcm", gray)
    (tmp_path / "scan.png").write_bytes(path.read_bytes())  # a PACS export renamed by a careless script
    np.testing.assert_allclose(load(tmp_path / "scan.png"), png_input, atol=1e-6, rtol=0)
    upload = io.BytesIO(path.read_bytes())
    upload.name = "upload"  # an upload without a suffix: its marker tells
    np.testing.assert_allclose(DataConfig(SIZE).load(upload), png_input, atol=1e-6, rtol=0)


def _hostile(path: Path, syntax, frame: bytes, rows: int = 256, cols: int = 256) -> Path:
    """A small 8-bit gray header (rows x cols) over an encapsulated first frame that says otherwise."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(write_dicom(path, np.zeros((rows, cols), np.uint8), syntax=RLELossless))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds.save_as(path, enforce_file_format=True)
    return path


def _patched_sof(frame: bytes, marker: bytes, rows: int, cols: int) -> bytes:
    """`frame` with its start-of-frame segment claiming rows x cols (2 + 2 + 1 bytes in: height, width)."""
    at = frame.index(marker) + 5
    return frame[:at] + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + frame[at + 4:]


def _rle_header(segments: int, *offsets: int) -> bytes:
    import struct

    return struct.pack("<16I", segments, *offsets, *[0] * (15 - len(offsets)))


def _frames_that_lie() -> dict[str, tuple]:
    """name -> (transfer syntax, first frame, words of the refusal), each under a 256 x 256 8-bit header."""
    import io

    import openjpeg
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = io.BytesIO()
    Image.new("L", (3000, 3000)).save(jpeg, format="JPEG")  # 105 KB of JPEG, 9 Mpixel once decoded
    jls_file = pydicom.dcmread(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm")
    jls = pydicom.encaps.get_frame(jls_file.PixelData, 0, number_of_frames=1)
    # Each pair 0x81 v is 128 bytes once decoded: 100 KB here that pydicom's own RLE decoder would expand
    # to 6.4 MB before comparing it with the header (pylibjpeg-rle refuses the offset first).
    runs = b"\x81\x00" * 50_000
    return {
        "JPEG 2000": (JPEG2000Lossless, openjpeg.encode(np.zeros((3000, 3000), np.uint8)), "3000 x 3000"),
        "JPEG baseline": (JPEGBaseline8Bit, jpeg.getvalue(), "3000 x 3000"),
        "JPEG-LS SOF55 patched": (JPEGLSLossless, _patched_sof(jls, b"\xff\xf7", 12000, 12000), "12000 x 12000"),
        "RLE offset inside its header": (RLELossless, _rle_header(1, 16) + runs, "RLE"),
        "RLE segments not 1 per byte": (RLELossless, _rle_header(2, 64, 64 + len(runs)) + runs * 2, "RLE"),
    }


@pytest.mark.parametrize("name", list(_frames_that_lie()))
def test_a_compressed_frame_larger_than_its_header_is_refused_before_decoding(tmp_path, monkeypatch, name):
    import pydicom.pixels
    import tracemalloc

    syntax, frame, words = _frames_that_lie()[name]
    path = _hostile(tmp_path / "lie.dcm", syntax, frame)
    decoded = []
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: decoded.append(a) or np.zeros((256, 256)))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            decode_gray(str(path), SIZE, max_pixels=10**8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and words in message, message
    assert not decoded and peak < 2_000_000, (decoded, peak)


def test_a_dicom_upload_under_an_image_name_is_read_from_its_start(tmp_path, gray, png_input):
    import io

    upload = io.BytesIO(write_dicom(tmp_path / "m2.dcm", gray).read_bytes())
    upload.name = "x.png"  # Pillow reads (and refuses) it first, leaving the stream part way in
    np.testing.assert_allclose(DataConfig(SIZE).load(upload), png_input, atol=1e-6, rtol=0)
    upload.seek(40)
    from common.images.dicom import is_dicom

    assert is_dicom(upload) and upload.tell() == 40  # the marker is looked for at byte 128 of the file


@pytest.mark.parametrize("tags, words", [
    ({"RescaleSlope": "NaN", "RescaleIntercept": "0"}, "Rescale Slope"),
    ({"RescaleSlope": "1", "RescaleIntercept": "-inf"}, "Rescale Intercept"),
    ({"RescaleSlope": "0", "RescaleIntercept": "0"}, "Rescale Slope"),
    ({"RescaleSlope": "1e300", "RescaleIntercept": "0"}, "Rescale Slope"),  # 255e300: no float32
    ({"RescaleSlope": "1", "RescaleIntercept": "1e12"}, "Rescale Intercept"),  # steps of 1 lost at 1e12
    ({"WindowCenter": "NaN", "WindowWidth": "400"}, "Window Center"),
    ({"RescaleSlope": "", "RescaleIntercept": "0"}, "Rescale Slope"),  # pydicom would multiply by None
    ({"BitsStored": 2000, "RescaleSlope": "1", "RescaleIntercept": "0"}, "Bits Stored"),
], ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else None)
def test_a_non_finite_or_absurd_value_transform_is_refused_naming_the_tag(tmp_path, monkeypatch, gray, tags, words):
    from pydicom import config

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)  # lets pydicom write them
    path = write_dicom(tmp_path / "rescale.dcm", gray, **tags)
    with pytest.raises(ValueError) as info:
        decode_gray(str(path), SIZE)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and words in message, message


def _encoded(ds: Dataset) -> bytes:
    """`ds` as Explicit VR Little Endian bytes, as a deflated file holds them before deflating."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _deflated_bomb(path: Path, tag: int, megabytes: int = 300) -> Path:
    """A Deflated Explicit VR Little Endian file (~300 KB): a 256 x 256 8-bit header with a PatientID, and
    `megabytes` MB of zeros as the OB element `tag`, in tag order; deflated here piece by piece, so the
    test never holds the inflated dataset."""
    import struct
    import zlib

    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(write_dicom(path, np.zeros((256, 256), np.uint8), PatientID="p1"))
    del ds.PixelData
    before, after = Dataset(), Dataset()
    for element in ds:
        (before if element.tag < tag else after).add(element)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 says
    zeros = bytes(2**20)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta)
        f.write(deflate.compress(_encoded(before) + struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"OB", 0,
                                                                megabytes * len(zeros))))
        for _ in range(megabytes):
            f.write(deflate.compress(zeros))
        f.write(deflate.compress(_encoded(after)) + deflate.flush())
    return path


def _peak(call):
    """What `call()` returned (or raised) and the most memory Python held meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            out = call()
        except Exception as exc:  # noqa: BLE001 - returned for the caller's assertions
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_deflated_dicom_decodes_as_its_uncompressed_twin(tmp_path, gray):
    import io

    from common.data.dicom_kind import read_dicom_headers
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stored = gray.astype(np.uint16) * 16
    plain = write_dicom(tmp_path / "plain.dcm", stored, bits=12, PatientID="p1", WindowCenter="2000",
                        WindowWidth="3000")
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    deflated = tmp_path / "deflated.dcm"
    assert deflated.stat().st_size < plain.stat().st_size / 1.5  # pydicom did deflate it
    expected = decode_dicom(str(plain), 10**8)
    values, scale = decode_dicom(str(deflated), 10**8)
    assert scale == expected[1] and np.array_equal(values, expected[0])
    upload = io.BytesIO(deflated.read_bytes())
    upload.name = "upload.dcm"
    values, scale = decode_dicom(upload, 10**8)
    assert scale == expected[1] and np.array_equal(values, expected[0])
    assert read_dicom_headers([str(deflated)]) == read_dicom_headers([str(plain)])
    assert read_dicom_headers([str(deflated)])[0][0] == "p1"


def test_a_deflated_bomb_is_refused_before_it_inflates(tmp_path):
    import io

    from common.data.dicom_kind import read_dicom_headers

    # 300 KB that inflates to 300 MB of "pixel data" under a 256 x 256 header: refused once the inflated
    # dataset passes what 256 x 256 pixels (max_pixels) can need, having held about that much.
    path = _deflated_bomb(tmp_path / "bomb.dcm", 0x7FE00010)
    assert path.stat().st_size < 2_000_000
    upload = io.BytesIO(path.read_bytes())
    upload.name = "upload.dcm"
    for source, name in ((str(path), str(path)), (upload, "upload.dcm")):
        error, peak = _peak(lambda: decode_gray(source, SIZE, max_pixels=256 * 256))
        assert isinstance(error, ValueError), error
        message = str(error)
        assert "\n" not in message and message.startswith(f"{name}: ") and "inflates" in message, message
        assert peak < 40_000_000, peak
    # The header scan stops before the pixel data: it reads the tags and inflates no more than a header may need.
    headers, peak = _peak(lambda: read_dicom_headers([str(path)]))
    assert headers[0][0] == "p1" and peak < 40_000_000, (headers, peak)


def test_a_deflated_header_larger_than_any_header_is_refused(tmp_path):
    from common.images.dicom import read_dataset
    from common.data.dicom_kind import DICOM_TAGS, read_dicom_headers

    # 300 MB of a private element before the PatientID: no header needs that much before its pixels.
    path = _deflated_bomb(tmp_path / "bomb.dcm", 0x00091000)
    error, peak = _peak(lambda: read_dataset(str(path), DICOM_TAGS, stop_before_pixels=True))
    assert isinstance(error, ValueError), error
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}: ") and "inflates" in message, message
    assert peak < 40_000_000, peak
    assert read_dicom_headers([str(path)]) == [(None, "not DICOM")]


def test_deflated_data_cut_short_or_corrupt_is_one_line(tmp_path, gray):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(write_dicom(tmp_path / "plain.dcm", gray))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    data = (tmp_path / "deflated.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:len(data) // 2])
    deflated_at = 144 + int.from_bytes(data[140:144], "little")  # after the file meta group, by its length
    (tmp_path / "corrupt.dcm").write_bytes(data[:deflated_at] + b"\xff" + data[deflated_at + 1:])  # invalid block type
    for name in ("cut.dcm", "corrupt.dcm"):
        with pytest.raises(ValueError) as info:
            decode_gray(str(tmp_path / name), SIZE)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / name}: not a readable DICOM"), message


def test_jpeg_frame_sizes_are_read_from_the_marker_segments():
    from common.images.dicom import _jpeg_frame_size

    buf = io.BytesIO()
    Image.fromarray(np.zeros((37, 53), np.uint8)).save(buf, format="JPEG")
    assert _jpeg_frame_size(buf.getvalue()) == (53, 37, 1)
    # JPEG-LS: SOI, an APP segment, SOF55 claiming 12000 x 9000 with 1 component, then the scan.
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, 9000, 12000, 1) + b"\x01\x11\x00"
    frame = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + sof55 + b"\xff\xda\x00\x08" + bytes(6)
    assert _jpeg_frame_size(frame) == (12000, 9000, 1)
    for bad in (b"\x00\x00", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xc0\x00\x11\x08"):
        with pytest.raises(ValueError):
            _jpeg_frame_size(bad)
