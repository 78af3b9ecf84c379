"""The life of a store directory while a job writes it.

    <store>/_work/plan.json          what this run will produce (fingerprint of inputs + settings)
    <store>/_work/chunk-00000/       committed chunks, each renamed into place only when complete
    <store>/split=*/ errors/         published from the chunks at the end
    <store>/manifest.json            written last: its presence means the store is complete

A run killed at any point leaves no manifest, so nothing looks complete; restarted with the same
inputs it keeps every committed chunk. Only an explicit --overwrite discards an existing store.

A folder is a store only by this project's own marks: a readable manifest.json, or the
_work/plan.json of an unfinished run (with its format). Folder names such as split=* prove
nothing, and --overwrite deletes only what a store run writes (OWN), never other files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd

from common.safe_output import LOCK
from common.store import ERRORS_DIR, MANIFEST, SPLITS, write_manifest

WORK_DIR = "_work"
PLAN = "plan.json"
PLAN_FORMAT = "cxr-features/store-plan"
STAGING = "_staging"
# Everything a store run writes at the top of its folder: all that --overwrite may delete.
OWN = frozenset({MANIFEST, ERRORS_DIR, WORK_DIR, *(f"split={s}" for s in SPLITS)})


class OutputError(RuntimeError):
    pass


def plan_fingerprint(table: pd.DataFrame, settings: dict) -> str:
    """Same images, paths, splits and settings <=> same fingerprint <=> chunks can be reused."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    rows = table["image_id"] + "\t" + table["path"] + "\t" + table["split"].astype(str)
    digest.update("\n".join(rows).encode())
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_store_dir(out: Path) -> bool:
    manifest = _read_json(out / MANIFEST)
    plan = _read_json(out / WORK_DIR / PLAN)
    return (manifest is not None and "format_version" in manifest) or (plan is not None and plan.get("format") == PLAN_FORMAT)


def _own(name: str) -> bool:
    return name in OWN or name.startswith(f".{MANIFEST}.tmp")


def _clear(out: Path, log) -> None:
    """Delete what a store run wrote (manifest first, so a half-cleared store never looks complete)."""
    (out / MANIFEST).unlink(missing_ok=True)
    kept = []
    for child in sorted(out.iterdir()):
        if child.name == LOCK:
            continue  # this run's own lock
        if not _own(child.name):
            kept.append(child.name)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if kept:
        log(f"--overwrite: kept {len(kept)} file(s) this project did not write: {', '.join(kept[:5])}")


def prepare_output(out: str | Path, overwrite: bool, fingerprint: str, plan: dict, log=print) -> Path:
    """Make `out` ready for this run and return its work directory (resuming when it can)."""
    out = Path(out)
    work = out / WORK_DIR
    if out.exists() and any(c.name != LOCK for c in out.iterdir()):
        if not _is_store_dir(out):
            raise OutputError(f"--out {out}: exists and is not a feature store of this project (no {MANIFEST}, "
                              f"no {WORK_DIR}/{PLAN}); refusing to write into it, even with --overwrite")
        previous = (_read_json(work / PLAN) or {}).get("fingerprint")
        if (out / MANIFEST).exists() and not overwrite:
            raise OutputError(f"--out {out}: a complete feature store is already here; pass --overwrite to replace it")
        if overwrite:
            log(f"--overwrite: discarding the store in {out}")
            _clear(out, log)
        elif previous != fingerprint:
            raise OutputError(f"--out {out}: holds an unfinished run with other inputs or settings; "
                              "pass --overwrite to discard it")
        else:
            log(f"resuming the unfinished run in {out}")
    work.mkdir(parents=True, exist_ok=True)
    (work / PLAN).write_text(json.dumps({**plan, "format": PLAN_FORMAT, "fingerprint": fingerprint}, indent=2,
                                        sort_keys=True))
    return work


def chunk_dir(work: Path, index: int) -> Path:
    return work / f"chunk-{index:05d}"


def is_committed(work: Path, index: int) -> bool:
    return chunk_dir(work, index).is_dir()


def commit_chunk(tmp: Path, work: Path, index: int) -> None:
    # A directory rename is atomic on POSIX file systems (local disks, NFS, Lustre, GPFS).
    tmp.rename(chunk_dir(work, index))


def publish(out: str | Path, staging: Path, manifest: dict) -> None:
    """Move the staged split folders and errors into the store, then write the manifest last."""
    out = Path(out)
    for stale in [*out.glob("split=*"), out / ERRORS_DIR]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while publishing
    for part in [*staging.glob("split=*"), staging / ERRORS_DIR]:
        if part.exists():
            part.rename(out / part.name)
    write_manifest(out, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
