"""Image decoding: a file -> one gray channel in Pillow's float mode, with its value scale.

Pure functions (no Spark, no torch). DICOM files go through common/images/dicom.py, which gives the same
kind of (mode 'F' image, scale) pair. The geometry that turns the decoded image into a network
input is common/images/data_config.py's job; `read_gray` is the plain resize used for displays.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.images.dicom import decode_dicom, is_dicom, named_dicom, source_name

DECODE_VERSION = 1  # bump when decoded values change (here, common/images/dicom.py, DataConfig.load): keys decode caches

try:  # PNGs through OpenCV's libpng: the same pixels as Pillow, ~10% less time per image (bench/decoders.py)
    import cv2
except ImportError:  # optional: without it every PNG goes to Pillow, with the same result
    cv2 = None
else:
    cv2.setNumThreads(1)  # Spark tasks and the service's threads set their own parallelism

# True: PNGs are decoded by OpenCV where it gives Pillow's exact pixels (Pillow for the rest and for
# anything OpenCV refuses); False forces Pillow for every file (benchmark, tests).
FAST_PNG = cv2 is not None
# Pillow modes of the PNGs OpenCV decodes here: 1/2/4/8-bit gray, 16-bit gray, 8-bit RGB, RGBA, gray+alpha
# and palette (16-bit colour goes to Pillow, which keeps its high bytes; told apart by the header).
_OPENCV_PNG_MODES = ("1", "L", "I;16", "I", "RGB", "RGBA", "LA", "P")

# Integer modes Pillow gives 16-bit grayscale files (PNG opens as 'I;16' in recent Pillow,
# as 'I' in older ones; big-endian TIFF as 'I;16B').
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Radiographs are at most ~4300 x 4300 (17" detectors at 100 um); 50 Mpixel leaves room and refuses
# files that pass Pillow's own bomb limit (~179 Mpixel) yet decode to near a gigabyte each.
MAX_PIXELS = 50_000_000
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# The only formats Pillow is asked to read: it knows many more, and opening one runs its plugin on the
# file (EPS hands it to Ghostscript; GIF, PPM, ... were never meant as radiographs).
FORMATS = ("PNG", "JPEG", "TIFF", "BMP")


def open_image(source) -> Image.Image:
    """`source` (a path or a seekable binary stream) opened, not yet decoded, by Pillow as one of FORMATS:
    the one way project code opens an image file. Any other file is an UnidentifiedImageError and a
    header over twice Pillow's decompression-bomb limit a ValueError, each one line naming the file."""
    name = source_name(source)
    try:
        return Image.open(source, formats=FORMATS)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"{name}: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name}: {' '.join(str(exc).split())}") from None


def decode_gray(path, min_side: int, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, float]:
    """Decode `path` (a file path, or a seekable binary stream such as an upload's io.BytesIO, named by
    its `name` attribute in messages) to a mode 'F' image and the factor that maps its values to [0, 1].

    8-bit images scale by 1/255 and 16-bit ones by 1/65535. Working in float mode for every
    input means no 8-bit rounding happens after a resize, and a 16-bit copy x*257 of an 8-bit
    image gives the same values. A JPEG may be decoded at a DCT-reduced scale whose sides stay
    >= `min_side`. A missing, truncated or non-image file raises, and so does one of more than
    `max_pixels` pixels, checked from the header before anything is decoded.

    DICOM is told by content (the 'DICM' marker at byte 128, whatever the name) or by a .dcm/.dicom name
    (a bare dataset without the preamble, or a .dcm that is not DICOM, which then raises); its first
    frame is decoded at full size (`min_side` does not apply) with the scale common/images/dicom.py gives.
    """
    # A file named as a Pillow image goes to Pillow without a look at its bytes (no second open on the
    # extraction's hot path); any other name is checked for the DICOM marker first.
    if named_dicom(path) or (not source_name(path).lower().endswith(PILLOW_SUFFIXES) and is_dicom(path)):
        return _dicom(path, max_pixels)
    try:
        img = open_image(path)
    except UnidentifiedImageError:
        if is_dicom(path):  # a DICOM file under an image name
            return _dicom(path, max_pixels)
        raise ValueError(f"{source_name(path)}: not an image file Pillow or pydicom reads "
                         f"({', '.join(FORMATS)}, DICOM)") from None
    with img:
        path = source_name(path)  # from here on only named in messages
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(f"{path}: {width} x {height} = {width * height / 1e6:.0f} Mpixel, more than the "
                             f"limit of {max_pixels / 1e6:g} Mpixel (--max-pixels)")
        if FAST_PNG and img.format == "PNG":
            fast = _png_with_opencv(img)
            if fast is not None:
                return fast
        img.draft("L", (min_side, min_side))
        # Decode now: a truncated file raises here instead of yielding a partly gray image.
        try:
            img.load()
        except OSError as exc:  # Pillow's decoder messages do not name the file
            raise OSError(f"{path}: {' '.join(str(exc).split())}") from None
        if img.mode in _SIXTEEN_BIT_MODES:
            if img.mode == "I":
                # 'I' is 32-bit signed: only 16-bit content has a known scale.
                low, high = img.getextrema()
                if low < 0 or high > 65535:
                    raise ValueError(f"{path}: 32-bit integer image with values {low}..{high}, outside 16-bit range")
            return img.convert("F"), 1.0 / 65535.0
        if img.mode == "F":
            raise ValueError(f"{path}: float image (mode F) has no known value range")
        # convert('L') first: for 'P' a direct convert('F') would give palette indices.
        gray = img if img.mode == "L" else img.convert("L")
        return gray.convert("F"), 1.0 / 255.0


def _png_with_opencv(img: Image.Image) -> tuple[Image.Image, float] | None:
    """The PNG `img` (opened by Pillow, not loaded) decoded by OpenCV to the values Pillow gives: PNG is
    lossless, and the colour to gray step stays Pillow's. None where Pillow is to decode: a mode or
    bit depth not listed above, an animated PNG, or a file OpenCV cannot decode (a broken file, which
    Pillow then reads or refuses with its own message)."""
    if img.mode not in _OPENCV_PNG_MODES or getattr(img, "is_animated", False):
        return None
    img.fp.seek(0)  # Image.open read from the stream's start too
    data = img.fp.read()
    if data[24] == 16 and data[25] != 0:  # IHDR bit depth 16, colour type not gray
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape[:2] != (img.height, img.width):
        return None
    if pixels.ndim == 2:  # gray: uint8 ('1' and 2/4-bit gray scaled to 0..255, as Pillow does) or uint16
        return Image.fromarray(pixels).convert("F"), 1.0 / (65535.0 if pixels.dtype == np.uint16 else 255.0)
    if pixels.dtype != np.uint8 or pixels.shape[2] not in (3, 4):
        return None
    # OpenCV gives BGR(A) (palette and gray+alpha expanded); Pillow's RGB -> L keeps its luma rounding.
    rgb = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
    return Image.fromarray(rgb).convert("L").convert("F"), 1.0 / 255.0


def _dicom(path, max_pixels: int) -> tuple[Image.Image, float]:
    values, scale = decode_dicom(path, max_pixels)
    return Image.fromarray(values), scale  # float32 2-D: mode 'F'


def to_unit_array(gray: Image.Image, scale: float) -> np.ndarray:
    """A decoded (and resized) mode 'F' image as float32 in [0, 1]."""
    out = np.asarray(gray, dtype=np.float32) * np.float32(scale)
    # Bilinear and bicubic resizes can step past the ends (bicubic overshoots by design).
    return np.clip(out, 0.0, 1.0, out=out)


def read_gray(path: str, size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`path` resized to exactly size=(width, height), float32 in [0, 1]: for overlays and displays."""
    gray, scale = decode_gray(path, max(size), max_pixels)
    return to_unit_array(gray.resize(size, Image.Resampling.BILINEAR), scale)
