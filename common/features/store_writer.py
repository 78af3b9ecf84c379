"""The life of a store while a job writes it, on any file system (common/fs.py): no step relies on rename.

    <store>/_work/plan.json                  what this run will produce (fingerprint of inputs + settings)
    <store>/_work/chunk-00000/<kind>-...parquet  files the executors wrote, one per task attempt and kind
    <store>/_work/chunk-00000.json           the chunk's commit marker: the files of its successful attempts
    <store>/split=*/ errors/                 compacted from the committed files at the end
    <store>/manifest.json                    written last: lists the store's data files; its presence
                                             means the store is complete

Executors write their own Parquet files under names unique to the task attempt, and return the names
to the driver; Spark hands the driver one result per partition (a retried or speculative attempt's
files are never among them), and the driver commits the chunk by writing its marker, one atomic PUT
(an os.replace on a local disk). A file no marker lists is a killed or superseded attempt's: readers
and restarts ignore it and the end of the run deletes it. A run killed at any point leaves no
manifest, so nothing looks complete; restarted with the same inputs it keeps every committed chunk.
Only an explicit --overwrite discards an existing store.

A folder is a store only by this project's own marks: a readable manifest.json, or the
_work/plan.json of an unfinished run (with its format). Folder names such as split=* prove
nothing, and --overwrite deletes only what a store run writes (OWN), never other files.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common import fs
from common.runs.command import InputError
from common.runs.safe_output import LOCK
from common.features.store import ERROR_SCHEMA, ERRORS_DIR, MANIFEST, MASKED_FIELDS, ROW_SCHEMA, SPLITS, write_manifest

WORK_DIR = "_work"
PLAN = "plan.json"
PLAN_FORMAT = "cxr-features/store-plan"
# Everything a store run writes at the top of its folder: all that --overwrite may delete.
OWN = frozenset({MANIFEST, ERRORS_DIR, WORK_DIR, *(f"split={s}" for s in SPLITS)})
# What a task's result rows say of each file it wrote (the mapInPandas output schema).
FILES_DDL = "kind string, file string, rows long, ran string"


# A task's result row for an I/O failure of a store it reads or writes (`file` says why): see failure_row.
STORE_FAILURE = "store-failure"


class OutputError(InputError, RuntimeError):
    pass


class StoreFailure(OSError):
    """A task could not read or write a store (it stopped answering, refused, or its disk is full)."""


def failure_row(exc: OSError) -> dict:
    """What a task returns instead of raising when a store fails it: the driver stops in one line
    (check_results) and Spark logs no task traceback; nothing the task wrote is committed."""
    return {"kind": STORE_FAILURE, "file": " ".join(str(exc).split())[:300], "rows": 0}


def check_results(results) -> None:
    """StoreFailure with the first failing task's reason, when any task reported one (failure_row)."""
    for result in results:
        if result["kind"] == STORE_FAILURE:
            raise StoreFailure(result["file"])


def plan_fingerprint(table: pd.DataFrame, settings: dict) -> str:
    """Same images, paths, splits and settings <=> same fingerprint <=> chunks can be reused."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    rows = table["image_id"] + "\t" + table["path"] + "\t" + table["split"].astype(str)
    digest.update("\n".join(rows).encode())
    return digest.hexdigest()


def _read_json(path: str) -> dict | None:
    try:
        obj = json.loads(fs.read_bytes(path))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_store_dir(out: str) -> bool:
    manifest = _read_json(fs.join(out, MANIFEST))
    plan = _read_json(fs.join(out, WORK_DIR, PLAN))
    return (manifest is not None and "format_version" in manifest) or (plan is not None and plan.get("format") == PLAN_FORMAT)


def _own(name: str) -> bool:
    return name in OWN or name.startswith(f".{MANIFEST}.tmp")


def _clear(out: str, log) -> None:
    """Delete what a store run wrote (manifest first, so a half-cleared store never looks complete)."""
    fs.delete(fs.join(out, MANIFEST))
    kept = []
    for name in fs.names(out):
        if name == LOCK:
            continue  # this run's own lock
        if _own(name):
            fs.delete(fs.join(out, name))
        else:
            kept.append(name)
    if kept:
        log(f"--overwrite: kept {len(kept)} file(s) this project did not write: {', '.join(kept[:5])}")


def prepare_output(out: str, overwrite: bool, fingerprint: str, plan: dict, log=print) -> str:
    """Make `out` ready for this run and return its work directory (resuming when it can)."""
    out = str(out)
    work = fs.join(out, WORK_DIR)
    if any(name != LOCK for name in fs.names(out)):
        if not _is_store_dir(out):
            raise OutputError(f"--out {out}: exists and is not a feature store of this project (no {MANIFEST}, "
                              f"no {WORK_DIR}/{PLAN}); refusing to write into it, even with --overwrite")
        previous = (_read_json(fs.join(work, PLAN)) or {}).get("fingerprint")
        if fs.exists(fs.join(out, MANIFEST)) and not overwrite:
            raise OutputError(f"--out {out}: a complete feature store is already here; pass --overwrite to replace it")
        if overwrite:
            log(f"--overwrite: discarding the store in {out}")
            _clear(out, log)
        elif previous != fingerprint:
            raise OutputError(f"--out {out}: holds an unfinished run with other inputs or settings; "
                              "pass --overwrite to discard it")
        else:
            log(f"resuming the unfinished run in {out}")
    fs.make_dirs(work)
    fs.write_bytes(fs.join(work, PLAN), json.dumps({**plan, "format": PLAN_FORMAT, "fingerprint": fingerprint},
                                                   indent=2, sort_keys=True).encode())
    return work


def chunk_dir(work: str, index: int) -> str:
    return fs.join(work, f"chunk-{index:05d}")


def chunk_marker(work: str, index: int) -> str:
    return fs.join(work, f"chunk-{index:05d}.json")


def read_marker(work: str, index: int) -> dict | None:
    """A committed chunk's marker ({"files": [{kind, file, rows, ran}, ...]}), or None: not committed."""
    marker = _read_json(chunk_marker(work, index))
    return marker if marker is not None and isinstance(marker.get("files"), list) else None


def is_committed(work: str, index: int) -> bool:
    return read_marker(work, index) is not None


def discard_uncommitted(work: str, index: int) -> None:
    """Before a chunk is (re)done: what a killed attempt of it left is of no use (and never read)."""
    fs.delete(chunk_dir(work, index))


def commit_chunk(work: str, index: int, files: list[dict]) -> None:
    """Commit a chunk: its marker lists the files of the attempts Spark kept (one per partition)."""
    fs.write_bytes(chunk_marker(work, index), json.dumps({"files": files}, indent=1).encode())


def _list_array(values: list, value_type: pa.DataType) -> pa.Array:
    """A list column from per-row sequences, built from one flat numpy array rather than value by value."""
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    dtype = value_type.to_pandas_dtype()
    flat = np.concatenate([np.asarray(v, dtype=dtype) for v in values]) if values else np.array([], dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def rows_table(frame: pd.DataFrame, masked: bool = False) -> pa.Table:
    """Good rows of a task's output as the store's Arrow schema (lists built from numpy, not row by row)."""
    schema = pa.schema([*ROW_SCHEMA, *(MASKED_FIELDS if masked else ())])
    columns = []
    for field in schema:
        values = frame[field.name]
        if pa.types.is_list(field.type):
            columns.append(_list_array(values.tolist(), field.type.value_type))
        else:
            columns.append(pa.Array.from_pandas(values, type=field.type))  # NaN, None and pd.NA are null
    return pa.Table.from_arrays(columns, schema=schema)


def write_task_files(work: str, index: int, frame: pd.DataFrame, partition: int, masked: bool = False) -> list[dict]:
    """In the executor: write one task attempt's rows, a file per split plus one for its errors, under names no
    other attempt uses; return what the marker will list (paths relative to the store)."""
    attempt = uuid.uuid4().hex[:12]
    failed = frame["error"].notna().to_numpy()
    written = []
    parts = [(split, frame[~failed & (frame["split"] == split).to_numpy()]) for split in SPLITS]
    for kind, rows in [*parts, (ERRORS_DIR, frame[failed])]:
        if rows.empty:
            continue
        name = f"{kind}-{partition:05d}-{attempt}.parquet"
        table = (pa.Table.from_pandas(rows[list(ERROR_SCHEMA.names)], schema=ERROR_SCHEMA, preserve_index=False)
                 if kind == ERRORS_DIR else rows_table(rows, masked))
        filesystem, where = fs.for_writing(fs.join(chunk_dir(work, index), name))
        pq.write_table(table, where, filesystem=filesystem)
        written.append({"kind": kind, "file": f"{WORK_DIR}/chunk-{index:05d}/{name}", "rows": len(rows)})
    return written


def compact_group(store: str, feature_dim: int, group: dict) -> dict:
    """In the executor: one output file from a group's committed files, rows sorted by image_id; a split's file
    comes back with the RunningStats of its features (the manifest's feature_stats, merged by the driver)."""
    from common.features.feature_stats import RunningStats
    from common.features.store import read_parquet

    kind = group["kind"]
    folder = ERRORS_DIR if kind == ERRORS_DIR else f"split={kind}"
    name = f"{folder}/part-{group['part']:05d}-{uuid.uuid4().hex[:12]}.parquet"
    try:
        table = read_parquet([fs.join(store, f) for f in group["files"]]).sort_by("image_id")
        filesystem, where = fs.for_writing(fs.join(store, name))
        pq.write_table(table, where, filesystem=filesystem)
    except OSError as exc:
        return {**failure_row(exc), "stats": None}
    stats = None
    if kind != ERRORS_DIR:
        features = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        stats = RunningStats(feature_dim).add(features.reshape(table.num_rows, feature_dim))
    return {"kind": kind, "file": name, "rows": table.num_rows, "stats": stats}


def publish(out: str, manifest: dict) -> None:
    """Delete what no output of this run is (a killed compaction's files), write the manifest last, drop _work."""
    listed = {fs.join(out, f) for files in manifest["files"].values() for f in files}
    for folder in [*(f"split={s}" for s in SPLITS), ERRORS_DIR]:
        for path, _ in fs.list_files(fs.join(out, folder)):
            if path not in listed:
                fs.delete(path)
    write_manifest(out, manifest)
    fs.delete(fs.join(out, WORK_DIR))
