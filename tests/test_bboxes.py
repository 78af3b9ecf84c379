import numpy as np
import pytest

from common.data.bboxes import BBOX_COLUMNS, NIH_BBOX_IMAGE_SIZE, read_nih_bboxes
from common.data.labels import NIH_LABELS
from common.data.tables import MetadataError
from tests.data_paths import NIH

BBOX_CSV = NIH / "BBox_List_2017.csv"
needs_bboxes = pytest.mark.skipif(not BBOX_CSV.is_file(), reason=f"box list not found at {BBOX_CSV}")

GOOD_ROWS = [
    "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661",
    "00026911_000.png,Infiltrate,555.885714285714,235.140740740741,206.967195767196,313.159788359788",
]


def _write(tmp_path, header, rows, name="BBox_List_2017.csv"):
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@needs_bboxes
def test_real_box_list_parses_every_row_into_nih_labels():
    table = read_nih_bboxes(BBOX_CSV)
    assert list(table.columns) == list(BBOX_COLUMNS)
    assert len(table) == 984
    assert table["image_id"].nunique() == 880
    assert set(table["label"]) <= set(NIH_LABELS)
    counts = table["label"].value_counts().to_dict()
    # The file's 'Infiltrate' rows, under the label list's spelling.
    assert counts == {
        "Atelectasis": 180, "Effusion": 153, "Cardiomegaly": 146, "Infiltration": 123,
        "Pneumonia": 120, "Pneumothorax": 98, "Mass": 85, "Nodule": 79,
    }
    xywh = table[["x", "y", "w", "h"]].to_numpy()
    assert xywh.dtype == np.float64
    assert (xywh >= 0).all() and (xywh[:, 2:] > 0).all()
    assert (table["x"] + table["w"] <= NIH_BBOX_IMAGE_SIZE).all()
    assert (table["y"] + table["h"] <= NIH_BBOX_IMAGE_SIZE).all()
    first = table.iloc[0]
    assert first["image_id"] == "00013118_008.png" and first["label"] == "Atelectasis"
    assert first["x"] == pytest.approx(225.084745762712) and first["h"] == pytest.approx(79.1864406779661)


@pytest.mark.parametrize(
    "header, suffix",
    [
        ("Image Index,Finding Label,Bbox [x,y,w,h],,,", ""),  # as published
        ("Image Index,Finding Label,Bbox [x,y,w,h]", ""),  # without the trailing empty names
        ('Image Index,Finding Label,"Bbox [x,y,w,h]",,,', ",,"),  # quoted, rows with extra empty columns
        ("\ufeffImage Index,Finding Label,x,y,w,h", ","),  # byte-order mark, tidy names
    ],
)
def test_header_variants_read_alike(tmp_path, header, suffix):
    table = read_nih_bboxes(_write(tmp_path, header, [r + suffix for r in GOOD_ROWS] + [""]))
    assert table["image_id"].tolist() == ["00013118_008.png", "00026911_000.png"]
    assert table["label"].tolist() == ["Atelectasis", "Infiltration"]
    assert table["w"].tolist() == pytest.approx([86.7796610169491, 206.967195767196])


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("00000001_000.png,Fracture,1,2,3,4", "row 3: unknown finding label 'Fracture'"),
        ("00000001_000.png,Mass,1,2,wide,4", "row 3: w = 'wide' is not a finite number"),
        ("00000001_000.png,Mass,1,2,3", "row 3: 5 fields"),
        ("00000001_000.png,Mass,1,2,3,4,5", "row 3: unexpected value '5'"),
        ("00000001_000.png,Mass,1,2,0,4", "row 3: box width and height must be positive"),
    ],
)
def test_bad_rows_are_refused_naming_file_and_row(tmp_path, bad_row, message):
    path = _write(tmp_path, "Image Index,Finding Label,Bbox [x,y,w,h],,,", [GOOD_ROWS[0], bad_row, GOOD_ROWS[1]])
    with pytest.raises(MetadataError) as err:
        read_nih_bboxes(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_other_files_are_refused(tmp_path):
    with pytest.raises(MetadataError, match="header starts"):
        read_nih_bboxes(_write(tmp_path, "Image Index,Finding Labels,Follow-up #", GOOD_ROWS))
    with pytest.raises(MetadataError, match="no boxes"):
        read_nih_bboxes(_write(tmp_path, "Image Index,Finding Label,Bbox [x,y,w,h],,,", []))
    with pytest.raises(MetadataError, match="not found"):
        read_nih_bboxes(tmp_path / "absent.csv")


def test_a_non_utf8_box_list_names_its_first_bad_line(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    rows = ["Image Index,Finding Label,Bbox [x,y,w,h],,,", GOOD_ROWS[0], GOOD_ROWS[1].replace(".png", "é.png")]
    path.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(MetadataError, match=r"BBox_List_2017\.csv: line 3: not UTF-8 \(byte 0xe9 at column 13,"):
        read_nih_bboxes(path)
