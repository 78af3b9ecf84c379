"""Reader for NIH's radiologist bounding boxes, `BBox_List_2017.csv`.

Columns: image_id, label (NIH_LABELS spelling), x, y, w, h as float, in pixels of the 1024 x 1024
original image (x, y the top-left corner). One row per box; an image may have boxes for several
labels.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd

from common.data.labels import NIH_LABELS
from common.data.tables import MetadataError, not_utf8

# NIH images are 1024 x 1024 and the boxes are given in those pixels.
NIH_BBOX_IMAGE_SIZE = 1024
BBOX_COLUMNS = ("image_id", "label", "x", "y", "w", "h")

# The box file names one finding differently from Data_Entry_2017.csv.
_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
_HEADER_START = ("Image Index", "Finding Label")


def read_nih_bboxes(path: str | Path) -> pd.DataFrame:
    """Read the box list positionally: image, finding, then four numbers x, y, w, h.

    The published header is `Image Index,Finding Label,Bbox [x,y,w,h],,,`: unquoted, its box
    cell splits into four names plus three empty ones, nine names over six-field rows. Reading by
    position makes the header's tail irrelevant; only its first two names are checked, to refuse
    a different file. Trailing empty fields on a row are tolerated, anything else past the sixth
    field is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: box list not found")
    rows = []
    # utf-8-sig: a copy saved by a spreadsheet may start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [cell.strip() for cell in next(reader, [])]
            if tuple(header[:2]) != _HEADER_START:
                raise MetadataError(f"{path}: row 1: header starts {header[:2]!r}, expected {list(_HEADER_START)!r}")
            for fields in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in fields):
                    continue  # blank line, e.g. at the end of the file
                rows.append(_parse_row([cell.strip() for cell in fields], path, line))
        except UnicodeDecodeError:
            raise MetadataError(not_utf8(path)) from None
    if not rows:
        raise MetadataError(f"{path}: no boxes after the header")
    table = pd.DataFrame(rows, columns=list(BBOX_COLUMNS))
    return table.astype({c: "float64" for c in ("x", "y", "w", "h")})


def _parse_row(fields: list[str], path: Path, line: int) -> tuple:
    if len(fields) < 6:
        raise MetadataError(f"{path}: row {line}: {len(fields)} fields, expected image, label, x, y, w, h")
    if any(fields[6:]):
        raise MetadataError(f"{path}: row {line}: unexpected value {next(c for c in fields[6:] if c)!r} after x, y, w, h")
    image_id, raw_label = fields[0], fields[1]
    if not image_id:
        raise MetadataError(f"{path}: row {line}: empty image index")
    label = _LABEL_ALIASES.get(raw_label, raw_label)
    if label not in NIH_LABELS:
        raise MetadataError(f"{path}: row {line}: unknown finding label {raw_label!r}")
    numbers = []
    for name, text in zip("xywh", fields[2:6]):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise MetadataError(f"{path}: row {line}: {name} = {text!r} is not a finite number")
        numbers.append(value)
    if numbers[2] <= 0 or numbers[3] <= 0:
        raise MetadataError(f"{path}: row {line}: box width and height must be positive, got w={fields[4]}, h={fields[5]}")
    return (image_id, label, *numbers)
