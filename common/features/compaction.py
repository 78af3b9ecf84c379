"""Compaction's pure side, on the driver: the committed chunks' files -> the groups that Spark tasks compact
(store_writer.compact_group), and what those tasks wrote -> the manifest's files, counts and statistics."""

from __future__ import annotations

import math
from collections import Counter

from common import fs
from common.features.feature_stats import RunningStats
from common.features.store import ERRORS_DIR, SPLITS, read_parquet
from common.features.store_writer import OutputError, check_results


def precision_ran(markers: list[dict], out: str) -> str | None:
    """The one device/precision ("cpu/bf16") every committed file was embedded with; None when there is no file.
    Features from fp16 on GPU and bf16 on CPU differ, so one store holds one: several are an OutputError."""
    ran: dict[str, int] = {}
    for marker in markers:
        for f in marker["files"]:
            ran[f["ran"]] = ran.get(f["ran"], 0) + f["rows"]
    if len(ran) > 1:
        raise OutputError(f"{out}: the chunks were embedded on different devices/precisions "
                          f"({', '.join(f'{k}: {v} images' for k, v in sorted(ran.items()))}); rerun with "
                          "--precision fp32 (and --overwrite), or on executors of one kind")
    return next(iter(ran), None)


def rows_per_file(file_mb: int, feature_dim: int) -> int:
    """Rows of `feature_dim` float32 features (and their other columns) in a file of about `file_mb` MiB."""
    return max(1, file_mb * 2**20 // (4 * feature_dim + 256))


def plan_compaction(markers: list[dict], rows_per_file: int) -> list[dict]:
    """Group the committed files into output files: per split, consecutive files of about `rows_per_file` rows
    in all (a few files per split, not one per task); every error into one file."""
    groups: list[dict] = []
    for kind in (*SPLITS, ERRORS_DIR):
        files = [f for marker in markers for f in marker["files"] if f["kind"] == kind]
        total = sum(f["rows"] for f in files)
        if not total:
            continue
        n_out = 1 if kind == ERRORS_DIR else math.ceil(total / rows_per_file)
        parts: dict[int, list[str]] = {}
        before = 0
        for f in files:
            parts.setdefault(min(n_out - 1, before * n_out // total), []).append(f["file"])
            before += f["rows"]
        groups += [{"kind": kind, "files": names, "part": k} for k, names in sorted(parts.items())]
    return groups


def tally_written(written: list[dict], feature_dim: int) -> dict:
    """The compaction tasks' results -> the store's files per split and errors (sorted: the order to read
    them), rows per split, the error count and each non-empty split's feature statistics (their parts'
    RunningStats merged). A task the store failed (store_writer.failure_row) stops it: published without that
    group, the store would lack its rows, and publishing deletes the chunks they were in."""
    check_results(written)
    files = {kind: sorted(w["file"] for w in written if w["kind"] == kind) for kind in (*SPLITS, ERRORS_DIR)}
    per_split = {s: sum(w["rows"] for w in written if w["kind"] == s) for s in SPLITS}
    stats = {}
    for split in (s for s in SPLITS if per_split[s]):
        merged = RunningStats(feature_dim)
        for w in written:
            if w["kind"] == split:
                merged.merge(w["stats"])
        stats[split] = merged.summary()
    return {"files": files, "splits": per_split, "errors": sum(w["rows"] for w in written if w["kind"] == ERRORS_DIR),
            "feature_stats": stats}


def lung_qa_counts(out: str, files: dict[str, list[str]], ok: str) -> dict[str, int]:
    """Images per lung_qa value in a masked store's split files; a null (a chunk written before rows said
    `ok`) counts as `ok`."""
    good = [fs.join(out, f) for s in SPLITS for f in files[s]]
    flags = read_parquet(good, ["lung_qa"]).column("lung_qa").to_pylist() if good else []
    return dict(Counter(flag or ok for flag in flags))
