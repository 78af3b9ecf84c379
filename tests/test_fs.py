"""common/fs.py: local paths and URIs through one set of functions; images located and decoded behind a URI."""

import io
import os
import uuid

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common import fs
from common.images.data_config import DataConfig
from common.images.data_config import load_input as decode
from common.data.locate import locate_images


@pytest.fixture
def mem():
    """A fresh memory:// prefix (fsspec's in-process file system, the path for schemes pyarrow lacks)."""
    root = f"memory://t{uuid.uuid4().hex[:8]}"
    yield root
    fs.delete(root)


def test_join_keeps_scheme_and_query_and_plain_paths_stay_plain():
    assert fs.join("s3://b/x?endpoint_override=h:1", "y", "z.parquet") == "s3://b/x/y/z.parquet?endpoint_override=h:1"
    assert fs.join("s3://b/x/", "/y") == "s3://b/x/y"
    assert fs.join("stores/a", "split=train") == os.path.join("stores/a", "split=train")
    assert fs.is_local("stores/a") and fs.is_local("file:///tmp/a") and not fs.is_local("s3://b/a")
    assert fs.local_path("file:///tmp/a") == "/tmp/a"


def test_uri_of_rebuilds_what_a_listing_returns():
    assert fs.uri_of("s3://bucket/pre", "bucket/pre/a.png") == "s3://bucket/pre/a.png"
    assert fs.uri_of("/data/x", "/data/x/a.png") == "/data/x/a.png"


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_write_read_list_delete_on_either_file_system(kind, tmp_path, mem):
    root = str(tmp_path / "r") if kind == "local" else mem
    fs.write_bytes(fs.join(root, "a", "one.txt"), b"1")
    fs.write_bytes(fs.join(root, "a", "b", "two.txt"), b"22")
    assert fs.list_files(root) == [(fs.join(root, "a", "b", "two.txt"), 2), (fs.join(root, "a", "one.txt"), 1)]
    assert fs.read_bytes(fs.list_files(root)[0][0]) == b"22"
    assert fs.is_dir(fs.join(root, "a")) and fs.is_file(fs.join(root, "a", "one.txt"))
    assert fs.list_files(fs.join(root, "absent")) == []
    fs.delete(fs.join(root, "a", "b"))
    assert [p for p, _ in fs.list_files(root)] == [fs.join(root, "a", "one.txt")]
    fs.delete(fs.join(root, "nothing"))  # absent: nothing happens


def test_local_writes_replace_whole_files(tmp_path):
    target = tmp_path / "m.json"
    fs.write_bytes(str(target), b"old")
    fs.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp left


def test_unknown_scheme_and_missing_location_are_one_line_errors_naming_the_flag(mem):
    with pytest.raises(ValueError, match=r"^--out nosuch://x/y: no file system for this scheme"):
        fs.check_location("nosuch://x/y", "--out")
    fs.check_location(mem, "--images")  # fsspec's memory:// reaches: no error
    fs.check_location("relative/local/path", "--out")  # local paths are the job's own checks


def test_images_behind_a_uri_are_located_and_decoded_like_local_ones(mem, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 280), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    fs.write_bytes(f"{mem}/nih/images_001/a.png", buffer.getvalue())
    fs.write_bytes(f"{mem}/nih/images_002/b.png", b"not a png")
    fs.write_bytes(f"{mem}/nih/notes.txt", b"not an image name")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())

    by_name = locate_images(pd.DataFrame({"image_id": ["a.png", "b.png", "c.png"]}), f"{mem}/nih", "name")
    assert list(by_name.table["path"]) == [f"{mem}/nih/images_001/a.png", f"{mem}/nih/images_002/b.png"]
    assert by_name.missing == 1
    table = pd.DataFrame({"image_id": ["images_001/a.png", "nih/images_002/b.png", f"{mem}/nih/images_001/a.png",
                                       f"{mem}/nih/absent.png"]})
    by_path = locate_images(table, f"{mem}/nih", "relpath")
    assert list(by_path.table["path"]) == [f"{mem}/nih/images_001/a.png", f"{mem}/nih/images_002/b.png",
                                           f"{mem}/nih/images_001/a.png"]
    assert by_path.missing_examples == [f"{mem}/nih/absent.png"]

    load = DataConfig(64).load
    remote, error = decode(load, f"{mem}/nih/images_001/a.png")
    assert error is None and np.array_equal(remote, load(str(tmp_path / "a.png")))
    _, error = decode(load, f"{mem}/nih/images_002/b.png")
    assert f"{mem}/nih/images_002/b.png" in error  # the error row names the image by its URI
    _, error = decode(load, f"{mem}/nih/gone.png")
    assert error.startswith("FileNotFoundError")


def test_names_and_deleting_a_link_leave_what_it_points_at(tmp_path):
    """--overwrite deletes a store's own names through fs.delete: a link among them goes, its target stays."""
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "precious.txt").write_text("mine")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "split=train").symlink_to(tmp_path / "target")
    (tmp_path / "store" / "manifest.json").write_text("{}")
    assert fs.names(str(tmp_path / "store")) == ["manifest.json", "split=train"]
    assert fs.names(str(tmp_path / "absent")) == []
    fs.delete(str(tmp_path / "store" / "split=train"))
    assert fs.names(str(tmp_path / "store")) == ["manifest.json"]
    assert (tmp_path / "target" / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize("uri", ["s3://feat/../etc", "s3://feat/a/../../etc/x", "s3://feat//x", "s3://feat/./x",
                                 "gs://feat/x/..", "s3:///x", "memory://m/a/../b"])
def test_a_uri_naming_another_place_than_it_reads_as_is_refused_before_any_request(uri):
    with pytest.raises(ValueError) as info:
        fs.check_location(uri, "--out")
    assert str(info.value).startswith(f"--out {uri}: ") and "\n" not in str(info.value)
    for touch in (fs.write_bytes, fs.read_bytes, fs.delete):
        with pytest.raises(ValueError, match="refused|names no bucket"):
            touch(uri, b"x") if touch is fs.write_bytes else touch(uri)


def test_an_extraction_to_a_uri_with_dot_dot_is_one_line(capsys):
    from jobs import extract

    with pytest.raises(SystemExit) as info:
        extract.cli(["--config", "conf/sample.toml", "--out", "s3://feat/../etc"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "--out s3://feat/../etc: a URI with a '..', '.' or empty path segment is refused" in err
