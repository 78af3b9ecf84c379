"""common/atomic.py: the one whole-file writer; --overwrite knows its temporary names."""

import pytest

from common import atomic
from common.runs import rundir


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    target = tmp_path / "a.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_overwrite_deletes_a_killed_writers_temporary_files_and_no_others(tmp_path):
    out = rundir.prepare(tmp_path / "run", overwrite=False)
    own = [atomic.temporary_name(out / n).name for n in ("config.json", "head.pt", rundir.MARKER, "roc_val.png")]
    mine = [".notes.txt.123-456.tmp", "data.tmp", ".config.json.bak"]
    for name in own + mine:
        (out / name).write_text(name)
    rundir.clear(out, log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == sorted([rundir.MARKER, *mine])
