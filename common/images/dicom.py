"""DICOM radiographs -> one gray frame and its value scale, as common/images/decode.py decodes other files.

Pure functions (no Spark, no torch), pydicom 3 underneath; compressed transfer syntaxes decode through
its pixel-data plugins (pylibjpeg-libjpeg: JPEG baseline/extended/lossless and JPEG-LS;
pylibjpeg-openjpeg: JPEG 2000 and HTJ2K; pylibjpeg-rle: RLE, faster than pydicom's own). The pipeline
is the standard's: stored values -> Modality LUT (or Rescale Slope/Intercept) -> VOI LUT (or the
first Window Center/Width) -> [0, 1], with MONOCHROME1 (or a Presentation LUT Shape INVERSE) inverted so
bone is bright everywhere.
Only the tags below are parsed (pydicom's `specific_tags`) and none leaves this module but as pixels:
names, IDs and dates are never read.
"""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np

# A chest radiograph is a projection: these modalities store slices of a volume.
_VOLUME_MODALITIES = ("CT", "MR", "PT")
_GRAY = ("MONOCHROME1", "MONOCHROME2")
# What pydicom's decoders hand back as RGB (YBR_* converted when decoding).
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


# The Image Pixel, Modality LUT and VOI LUT modules and what tells a radiograph from a volume.
_TAGS = ["SOPClassUID", "ImageType", "Modality", "SliceThickness", "SpacingBetweenSlices",
         "PerFrameFunctionalGroupsSequence", "SamplesPerPixel", "PhotometricInterpretation",
         "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
         "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "WindowCenter",
         "WindowWidth", "VOILUTFunction", "VOILUTSequence", "PresentationLUTShape", "ExtendedOffsetTable",
         "ExtendedOffsetTableLengths",
         "PixelData", "FloatPixelData", "DoubleFloatPixelData"]


# The names that say "DICOM" (a bare dataset without the marker is DICOM only by its name). PACS
# exports also name files by UID or number with no such suffix: those are told by the marker.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

# A bare dataset (no 'DICM' marker) is taken for DICOM only when it holds one of these: every image
# object has them, and random bytes read with force do not.
_MARKER_TAGS = ("SOPClassUID", "Rows")

# What a dataset may hold besides its pixel data, inflated (Deflated Explicit VR Little Endian): a radiograph's
# header is a few KB; 16 MB leaves room for private tags, overlays and an icon. A header read that stops
# before the pixel data (stop_before_pixels) inflates no more than this, whatever the file holds after it.
HEADER_BYTES = 16 * 2**20
_INFLATE_IN, _INFLATE_OUT = 2**16, 2**20  # deflated bytes read, inflated bytes made, per step


class MultiFrameWarning(UserWarning):
    """A multi-frame file whose first frame was used."""


def source_name(source) -> str:
    """What messages call a file: its path, or an in-memory upload's `name` (the client's file name,
    used for messages and its suffix only, never as a path)."""
    return str(getattr(source, "name", None) or source) if hasattr(source, "read") else str(source)


def named_dicom(source) -> bool:
    return source_name(source).lower().endswith(DICOM_SUFFIXES)


def is_dicom(source) -> bool:
    """True for a file (a path, or a seekable binary stream) in the DICOM file format: 'DICM' after the
    128-byte preamble."""
    if hasattr(source, "read"):  # from its start, wherever an earlier look (Pillow's) left it
        position = source.seek(0, 1)
        source.seek(0)
        head = source.read(132)
        source.seek(position)
    else:
        with open(source, "rb") as f:
            head = f.read(132)
    return head[128:132] == b"DICM"


def read_dataset(path: str, tags, max_inflated: int = HEADER_BYTES, **options):
    """The DICOM dataset of `path` with only `tags` parsed (pydicom's `specific_tags`); a file that is
    not DICOM raises a one-line ValueError naming it.

    Without the 'DICM' marker, old or tool-written files hold a bare dataset, which pydicom reads with
    force; a file that is not DICOM at all is told apart by having none of the marker tags below.
    A deflated dataset (a ~1000-fold bomb for pydicom, which inflates it whole) is inflated here, to at most
    `max_inflated` bytes: more is refused, or with `stop_before_pixels` cut there and refused only where
    the cut comes before the pixel data.
    """
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    forced, label = not is_dicom(path), source_name(path)
    if hasattr(path, "seek"):
        path.seek(0)  # pydicom reads a stream from where it stands
    # What pydicom raises on a corrupt file (an element of no known VR, or of a length its VR cannot have, too).
    unreadable = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, OverflowError, zlib.error,
                  NotImplementedError, BytesLengthException)
    try:
        inflated, cut = (None, False) if forced else _inflate(path, max_inflated)
    except unreadable as exc:
        raise ValueError(f"{label}: not a readable DICOM file ({_one_line(exc)})") from None
    over = f"{label}: deflated DICOM data inflates to over {max_inflated / 2**20:.0f} MB"
    if cut and not options.get("stop_before_pixels"):
        raise ValueError(f"{over}, more than its pixels may need (--max-pixels)")
    try:
        ds = pydicom.dcmread(path if inflated is None else inflated, force=forced,
                             specific_tags=[*tags, *_MARKER_TAGS], **options)
    except unreadable as exc:
        raise ValueError(f"{label}: not a readable DICOM file ({_one_line(exc)})") from None
    # pydicom stops at the pixel data and steps back to its tag: a read that ends at the cut never got there.
    if cut and inflated.tell() >= inflated.seek(0, 2):
        raise ValueError(f"{over} before any pixel data")
    if inflated is not None:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # the file's, read inflated
    if forced and not any(tag in ds for tag in _MARKER_TAGS):
        raise ValueError(f"{label}: not a DICOM file (no 'DICM' marker at byte 128, no image header)")
    return ds


def _inflate(source, limit: int) -> tuple[io.BytesIO | None, bool]:
    """A Deflated Explicit VR Little Endian file rewritten in memory as Explicit VR Little Endian (which
    pydicom reads without inflating again), its dataset inflated piece by piece to at most `limit` bytes
    (one more tells that it holds more); and whether it was cut there. (None, False) for another file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    stream = source if hasattr(source, "read") else open(source, "rb")
    start = stream.tell()
    try:
        preamble = read_preamble(stream, False)
        meta = _read_file_meta_info(stream)  # pydicom's own: its deflated data starts where this stops
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None, False
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = io.BytesIO()
        out.write(preamble + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=False)
        dataset = out.tell()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
        while not inflater.eof and out.tell() - dataset <= limit:
            data = inflater.unconsumed_tail or stream.read(_INFLATE_IN)
            if not data:
                raise EOFError("deflated data cut short")
            out.write(inflater.decompress(data, min(_INFLATE_OUT, limit + 1 - (out.tell() - dataset))))
        cut = out.tell() - dataset > limit
        out.seek(0)
        return out, cut
    finally:
        if stream is source:
            stream.seek(start)
        else:
            stream.close()


def decode_dicom(path: str, max_pixels: int) -> tuple[np.ndarray, float]:
    """The first frame of DICOM `path` as a 2-D float32 array and the factor that maps it to [0, 1].

    Without a VOI LUT or window the stored range is the scale (BitsStored, after the Modality LUT),
    so an 8-bit DICOM gives the values/255 of its PNG and a 12-bit one values/4095. Anything that
    is not one 2-D radiograph, or has more than `max_pixels` pixels (from the header, before the
    pixels are decoded), raises a one-line ValueError naming the file; so do a compressed first frame
    whose codestream says another size than the header and a Rescale or Window that is no finite
    number, each found before decoding.
    """
    # Values over 1 MB (the pixels) are read only when used, after the header checks. A deflated file
    # inflates before them: to at most 4 bytes a pixel (32-bit gray, 8-bit RGB) and a header.
    ds = read_dataset(path, _TAGS, max_inflated=max_pixels * 4 + HEADER_BYTES, defer_size="1 MB")
    path = source_name(path)  # from here on only named in messages
    _check_header(path, ds, max_pixels)
    _check_value_transform(path, ds)
    if not ds.file_meta.get("TransferSyntaxUID"):
        # A bare dataset has no file meta: its encoding is what pydicom found when reading it.
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    _check_first_frame(path, ds)
    try:
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=0)
        return _to_scaled(ds, arr)
    except Exception as exc:  # missing plugin, truncated or corrupt pixel data, bad LUT: one line
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "unknown transfer syntax")
        raise ValueError(f"{path}: cannot decode DICOM pixel data ({syntax}): {_one_line(exc)}") from None


def _one_line(exc: Exception, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def _check_header(path: str, ds, max_pixels: int) -> None:
    """Refuse, from the header alone, what cannot be one 2-D radiograph."""
    has_pixels = "PixelData" in ds
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ValueError(f"{path}: DICOM float pixel data has no known value range")
    if not has_pixels:
        sop = _sop_class(ds)
        # An image SOP class without pixels is most likely cut short inside encapsulated pixel data.
        hint = "; truncated?" if "Image" in sop else ""
        raise ValueError(f"{path}: DICOM file has no pixel data (SOP class {sop}{hint})")
    modality = str(ds.get("Modality", ""))
    image_type = ds.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    if modality in _VOLUME_MODALITIES and "LOCALIZER" not in image_type:  # a CT scout is a projection
        raise ValueError(f"{path}: DICOM modality {modality} is a slice of a 3-D volume, not a radiograph")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols == 0:
        raise ValueError(f"{path}: DICOM header gives no image size (Rows {rows}, Columns {cols})")
    if rows * cols > max_pixels:
        raise ValueError(f"{path}: {cols} x {rows} = {rows * cols / 1e6:.0f} Mpixel, more than the "
                         f"limit of {max_pixels / 1e6:g} Mpixel (--max-pixels)")
    stored, allocated = int(ds.get("BitsStored") or 0), int(ds.get("BitsAllocated") or 0)
    if not 1 <= stored <= allocated <= 32:  # the stored range and pydicom's decoders rely on it
        raise ValueError(f"{path}: DICOM Bits Stored {stored} with Bits Allocated {allocated} is no integer "
                         "pixel layout (1 <= stored <= allocated <= 32)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GRAY + _COLOR:
        raise ValueError(f"{path}: DICOM photometric interpretation {photometric or 'missing'!r} is not supported")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        if _volume_geometry(ds):
            raise ValueError(f"{path}: DICOM holds {frames} frames with slice geometry: a 3-D volume, "
                             "not a radiograph")
        warnings.warn(f"{path}: DICOM holds {frames} frames; the first is used", MultiFrameWarning, stacklevel=3)


def _check_value_transform(path: str, ds) -> None:
    """Refuse a Rescale or Window that would make NaN, infinite or flat values of every pixel: found here,
    the file is named, where later the model would be blamed for NaN features."""
    for keyword in ("WindowCenter", "WindowWidth"):
        _number(path, ds, keyword)  # an empty one is no window, for pydicom too
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds or ds.get("ModalityLUTSequence"):
        return  # pydicom rescales only with both, and a Modality LUT takes precedence
    slope, intercept = _number(path, ds, "RescaleSlope", True), _number(path, ds, "RescaleIntercept", True)
    low, high = _rescaled_range(ds)
    # The values are float32 from here on: it must hold the range and still tell stored values apart.
    f32 = np.finfo(np.float32)
    if not (abs(slope) > float(f32.tiny) and max(abs(low), abs(high)) < float(f32.max) / 2):
        raise ValueError(f"{path}: DICOM {_tag('RescaleSlope')} {slope:g} gives the value range "
                         f"{low:g}..{high:g}, empty or beyond float32")
    if abs(intercept) > 2 ** 23 * abs(slope):
        raise ValueError(f"{path}: DICOM {_tag('RescaleIntercept')} {intercept:g} is over 2^23 steps of the "
                         f"Rescale Slope {slope:g}: float32 cannot tell the stored values apart")


def _number(path: str, ds, keyword: str, required: bool = False) -> float | None:
    """The first value of a numeric tag, None where absent or empty (refused if `required`); one line
    naming the tag where it is no finite number."""
    element = ds[keyword] if keyword in ds else None
    first = None if element is None else element.value[0] if element.VM > 1 else element.value
    if first is None or first == "":
        if required:
            raise ValueError(f"{path}: DICOM {_tag(keyword)} is empty")
        return None
    try:
        number = float(first)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise ValueError(f"{path}: DICOM {_tag(keyword)} is {str(first)!r}, not a finite number")
    return number


def _tag(keyword: str) -> str:
    """'Rescale Slope (0028,1053)': a tag as the standard names it."""
    from pydicom.datadict import dictionary_description, tag_for_keyword
    from pydicom.tag import Tag

    return f"{dictionary_description(keyword)} {Tag(tag_for_keyword(keyword))}"


def _check_first_frame(path: str, ds) -> None:
    """Refuse, before decoding, a compressed first frame whose own codestream is not the header's Rows x
    Columns x Samples per Pixel: decoders size their output from the codestream, so a 1 KB frame can
    claim gigapixels that the header (checked against --max-pixels) does not."""
    from pydicom import uid

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_transfer_syntax and not syntax.is_encapsulated:
        return  # native pixel data is what the header says
    name = syntax.name
    rle, jpeg2000 = syntax in uid.RLETransferSyntaxes, syntax in uid.JPEG2000TransferSyntaxes  # HTJ2K too
    if not (rle or jpeg2000 or syntax in uid.JPEGTransferSyntaxes + uid.JPEGLSTransferSyntaxes):
        raise ValueError(f"{path}: DICOM transfer syntax {name} is not supported")
    try:
        from pydicom.encaps import get_frame

        extended = ((ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
                    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds else None)
        frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames") or 1),
                          extended_offsets=extended)
        size = None if rle else _codestream_size(frame, jpeg2000)
    except Exception as exc:  # no first frame, or a codestream whose header does not parse
        raise ValueError(f"{path}: DICOM pixel data ({name}) has no readable first frame: {_one_line(exc)}") from None
    if rle:
        return _check_rle_header(path, ds, frame)
    header = int(ds.Columns), int(ds.Rows), int(ds.get("SamplesPerPixel") or 1)
    if size != header:
        raise ValueError(f"{path}: the first DICOM frame ({name}) is {size[0]} x {size[1]} with {size[2]} "
                         f"sample(s) per pixel, not the header's {header[0]} x {header[1]} with {header[2]}")


# Start-of-frame markers: JPEG's SOF0-3, 5-7, 9-11, 13-15 and JPEG-LS's SOF55 (0xF7).
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
# Markers that stand alone, without a length: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})


def _codestream_size(frame: bytes, jpeg2000: bool) -> tuple[int, int, int]:
    """(columns, rows, components) from a frame's main header (JPEG 2000's SIZ, read by openjpeg's parser) or
    start-of-frame segment (JPEG's SOFn, JPEG-LS's SOF55, read here): nothing is decoded. libjpeg's own
    parser is not asked: it spent seconds of CPU on a 1 KB JPEG-LS frame claiming 12000 x 12000."""
    if jpeg2000:
        import openjpeg

        info = openjpeg.get_parameters(frame)
        return info["columns"], info["rows"], info["samples_per_pixel"]
    return _jpeg_frame_size(frame)


def _jpeg_frame_size(data: bytes) -> tuple[int, int, int]:
    """(X, Y, Nf) of the first start-of-frame segment, walking the marker segments from SOI (ITU T.81 B.2)."""
    import struct

    if data[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start of image")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if length < 8 or i + 10 > len(data):
                raise ValueError("a start-of-frame segment cut short")
            rows, columns, components = struct.unpack(">HHB", data[i + 5:i + 10])
            return columns, rows, components
        if marker == 0xDA:
            break  # scan data before any frame header
        i += 2 + length
    raise ValueError("no start-of-frame segment before the scan")


def _check_rle_header(path: str, ds, frame: bytes) -> None:
    """An RLE frame's 64-byte header: one segment per byte of each sample (PS3.5 G.2), the first right after
    the header, each after the one before and inside the frame. Each segment decodes to Rows x Columns
    bytes; an offset pydicom's own decoder (pylibjpeg-rle's fallback) would take on trust lets it expand
    a segment ~64-fold before comparing it with the header."""
    import struct

    count, *offsets = struct.unpack("<16I", frame[:64].ljust(64, b"\0"))
    expected = int(ds.get("SamplesPerPixel") or 1) * -(-int(ds.BitsAllocated) // 8)
    used = offsets[:count]
    if count != expected or used[0] != 64 or sorted(set(used)) != used or used[-1] >= len(frame):
        raise ValueError(f"{path}: the first DICOM frame's RLE header gives {count} segment(s) at byte(s) "
                         f"{used[:4]} of {len(frame)}, not {expected} from byte 64 on")


def _volume_geometry(ds) -> bool:
    """Frames that are slices: a slice spacing/thickness, or a plane position per frame."""
    if "SpacingBetweenSlices" in ds or "SliceThickness" in ds:
        return True
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return bool(per_frame) and "PlanePositionSequence" in per_frame[0]


def _sop_class(ds) -> str:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown")


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0.0, float(2 ** bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _rescaled_range(ds) -> tuple[float, float]:
    """The stored range through Rescale Slope and Intercept."""
    low, high = _stored_range(ds)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    return tuple(sorted((low * slope + intercept, high * slope + intercept)))


def _to_scaled(ds, arr: np.ndarray) -> tuple[np.ndarray, float]:
    """Decoded first frame -> (values - low, 1 / (high - low)), [low, high] being the output range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric in _COLOR:
        # Gray as Pillow's convert('L') makes it from RGB (ITU-R 601-2 luma), exact for 8-bit data.
        if arr.dtype == np.uint8:
            from PIL import Image

            return np.asarray(Image.fromarray(arr, "RGB").convert("L"), dtype=np.float32), 1.0 / 255.0
        luma = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return luma.astype(np.float32), 1.0 / (2 ** int(ds.BitsStored) - 1)

    low, high = _stored_range(ds)
    if ds.get("ModalityLUTSequence"):
        # Its descriptor's bits per entry give the range (PS3.3 C.11.1.1.1), as pydicom's windowing assumes.
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        low, high = _rescaled_range(ds)
    values = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):
        if not np.issubdtype(values.dtype, np.integer):  # a LUT indexes integers; rescaled ones come as float
            values = np.rint(values).astype(np.int64)
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        # The LUT's own extremes are its output range: descriptors often claim 16 bits for 12-bit data.
        entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        lut = apply_voi_lut(np.arange(first, first + (entries or 65536)), ds, index=0, prefer_lut=True)
        low, high = float(lut.min()), float(lut.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # pydicom windows into the range the modality step can give, the [low, high] above.
        values = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    if not (np.isfinite(high - low) and high > low):
        raise ValueError(f"empty or non-finite value range {low:g}..{high:g}")
    out = values.astype(np.float32) - np.float32(low)
    # MONOCHROME1 (minimum is white) and a Presentation LUT Shape INVERSE each mean "displayed inverted";
    # DX files carry both together (PS3.3 C.8.11.6), which is still one inversion, not two.
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        out = np.float32(high - low) - out
    return out, 1.0 / (high - low)

