"""Spark job: chest X-ray archive -> Parquet feature store (docs/feature-store.md).

    ./spark-submit.sh jobs/extract.py --dataset nih --metadata Data_Entry_2017.csv \
        --images images/ --backbone densenet121 --weights imagenet --out stores/nih-densenet121

Images and the store are local paths or URIs (s3://, gs://, hdfs://, file://: common/fs.py). The driver
reads the metadata, finds the images and assigns patient-level splits. The images are processed in
committed chunks: each chunk is a Spark DataFrame of paths whose partitions run `mapInPandas`, where
every Python worker builds the frozen backbone once, decodes its images ahead of the model in threads
and embeds them in batches (on its task's GPU when it has one), then writes its rows itself. A chunk
is committed by a marker that lists the files of the attempts Spark kept (no rename, which object
stores lack), so a killed run restarts where it stopped and a retried task never doubles a row. At
the end Spark tasks compact the listed files into a few files per split, errors go to their own
file, and manifest.json, listing the store's files, is written last (docs/feature-store.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from common.atomic import atomic_path
from common.choices import PRECISIONS, SPLITS
from common.config import HelpFormatter, parse_with_config, require
from common.images.data_config import RESIZE_MODES
from common.images.decode import MAX_PIXELS
from common.runs.command import command_line, run_command
from common.runs.safe_output import OutputLock, RemoteLock, check_dir_path, is_disk_error
from common.data.table_flags import add_table_flags, check_table_flags
from jobs import workers_run_this_python

if TYPE_CHECKING:
    from common.features.plan import ExtractPlan

# torch, pyarrow and pandas are imported by the functions that use them, so that --help (and a
# flag error) answers at once; Spark's workers import what their function needs.

PROG = "jobs/extract.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file whose [extract] table sets defaults for these flags")
    add_table_flags(p)
    p.add_argument("--out", help="store to write: a folder, or a URI (s3://bucket/prefix, gs://..., hdfs://..., file://)")
    p.add_argument("--backbone", default="densenet121", help="registry name, e.g. resnet50, densenet121, inception_v3")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet[:ENUM], pretrained (a timm or torchxrayvision backbone's published weights), a checkpoint "
                        "path, or random[:SEED] (random only when asked for)")
    p.add_argument("--download-weights", action="store_true", help="fetch the published weights if not cached")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="auto: the task's GPU when Spark assigned one, else CPU")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on CPU, fp16 on GPU (autocast; features are stored as float32)")
    p.add_argument("--input-size", type=int,
                   help="network input size (default: a fine-tune checkpoint's own, else the backbone's)")
    p.add_argument("--resize", choices=RESIZE_MODES,
                   help="how a non-square image becomes square (default: a fine-tune checkpoint's own, else pad)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--chunk-size", type=int, default=4096, help="images per committed chunk (restart granularity)")
    p.add_argument("--images-per-task", type=int, default=64, help="images per Spark task")
    p.add_argument("--prefetch-batches", type=int, default=1,
                   help="batches a task decodes ahead while the model embeds the current one (0: none)")
    p.add_argument("--file-mb", type=int, default=128, help="target size of the store's Parquet files")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="images with more pixels are recorded as errors, unread (guards memory against huge files)")
    p.add_argument("--stall-timeout", type=float, default=1800.0,
                   help="seconds without any image finishing before the job stops as stuck (0: wait forever)")
    p.add_argument("--view", choices=["original", "masked"], default="original",
                   help="masked: embed the image with everything outside the lungs black (LeDNet); adds "
                        "lung_fraction and lung_qa columns")
    p.add_argument("--lung-model", default="default",
                   help="for --view masked: a lungs checkpoint (jobs/lung_model.py train), or default (the shipped one)")
    p.add_argument("--save-masks", metavar="DIR",
                   help="for --view masked: also write each lung mask there as a 0/255 PNG in the backbone's input "
                        "geometry (a folder every executor can write)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    return p


def log(message: str) -> None:
    print(f"[extract] {message}", file=sys.stderr, flush=True)


def make_task_fn(embed_fn, rows, tasks: int, work: str, chunk: int, done, errors):
    """The mapInPandas function of one chunk, run over `spark.range(tasks)`: task t embeds every tasks-th row of
    the chunk (`rows`, a broadcast DataFrame) from row t with its worker's models (`embed_fn`:
    common.features.extraction.make_embed_fn), writes its rows itself (store_writer.write_task_files: files
    named for this attempt, on any file system) and returns only what it wrote, for the driver's commit marker."""

    def run(task_ids):
        import pandas as pd
        from pyspark import SparkFiles, TaskContext

        from common.features.store_writer import failure_row, write_task_files

        def count(n_ok, n_err):
            done.add(n_ok + n_err)
            errors.add(n_err)

        task = TaskContext.get()
        gpus = task.resources().get("gpu")
        embed = embed_fn(gpus.addresses[0] if gpus else None, max(1, task.cpus()), SparkFiles.get)
        frames = [rows.value.iloc[int(t)::tasks] for ids in task_ids for t in ids["id"]]
        try:
            out = embed(frames, on_batch=count)
            files = ([] if out is None else
                     write_task_files(work, chunk, out, task.partitionId(), masked=embed.masker is not None))
        except OSError as exc:  # the images' or the output's store failed (not an image): the driver says so
            files = [failure_row(exc)]
        if files:
            yield pd.DataFrame([{**f, "ran": embed.ran} for f in files], columns=["kind", "file", "rows", "ran"])

    return run


class Progress:
    """A driver thread printing images done / total, images per second and errors so far; and the
    watchdog of a stuck job.

    A hung task (a read that never returns on a dead network mount, a wedged GPU) would wait
    forever: Spark has no task timeout, and a thread blocked in read() cannot be interrupted from
    inside the worker. So the driver watches: when no image finishes for `stall_seconds` it calls
    `on_stall` (cancel the Spark jobs) and the run stops with a message. Images are counted when
    their task ends, so the limit must exceed the longest task (--images-per-task images).
    """

    def __init__(self, total: int, already: int, done, errors, interval: float, stall_seconds: float = 0.0,
                 on_stall=lambda: None, clock: Callable[[], float] = time.monotonic):
        self.total, self.already, self.done, self.errors, self.interval = total, already, done, errors, interval
        self.stall_seconds, self.on_stall, self.stalled, self.clock = stall_seconds, on_stall, False, clock
        self.start = self._moved = self._printed = clock()
        self._last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def line(self) -> str:
        n = self.done.value
        rate = n / max(self.clock() - self.start, 1e-9)
        left = self.total - self.already - n
        eta = f", ETA {dt.timedelta(seconds=int(left / rate))}" if rate > 0 and left > 0 else ""
        pct = 100 * (self.already + n) / max(self.total, 1)
        errors = self.errors.value
        return (f"{self.already + n}/{self.total} images ({pct:.1f}%), {rate:.1f} images/s, "
                f"{errors} error{'' if errors == 1 else 's'}{eta}")

    def check(self) -> None:
        """One look at the clock and the counters (the thread's tick; tests call it with a clock of their own)."""
        now = self.clock()
        if self.done.value != self._last:
            self._last, self._moved = self.done.value, now
        elif self.stall_seconds and now - self._moved >= self.stall_seconds and not self.stalled:
            self.stalled = True
            log(f"no image finished for {self.stall_seconds:g} s (--stall-timeout): stopping the stuck job")
            self.on_stall()
        if now - self._printed >= self.interval:
            self._printed = now
            log(self.line())

    def _loop(self):
        tick = min(self.interval, self.stall_seconds) if self.stall_seconds else self.interval
        while not self._stop.wait(tick):
            self.check()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def get_spark():
    from pyspark.sql import SparkSession

    workers_run_this_python()
    return (SparkSession.builder.appName("cxr-features extract")
            .config("spark.ui.showConsoleProgress", "false").getOrCreate())


@contextmanager
def stopped_by_store(out: str, committed: Callable[[], str]):
    """A run its store stops (unreachable, refusing, full; on the driver or in a task) ends in one OutputError line
    naming the store, what is committed (`committed()`) and how to go on; any other failure passes through."""
    from common import fs
    from common.features.store_writer import OutputError

    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and is_disk_error(exc):
            raise  # the driver's full or read-only disk: run_command's line names the file
        if isinstance(exc, OSError):  # the driver's own store I/O, or a task's StoreFailure
            reason = " ".join(str(exc).split())[:300]
        else:  # Spark's report of a failed task: was it the store?
            try:
                fs.info(out)
            except OSError as probe:
                reason = "the store stopped answering: " + " ".join(str(probe).split())[:300]
            else:
                raise
        raise OutputError(f"--out {out}: {reason}; {committed()}: run the same command again to resume") from None


def run_chunks(spark, table, work: str, plan: ExtractPlan, embed_fn, lock=None) -> dict:
    """Process every uncommitted chunk; returns timing figures for the summary. A chunk is committed only while
    `lock` is this job's (an object store's lock can be taken by a job started in the same instant)."""
    from common.features.extraction import INPUT_COLUMNS
    from common.features.store_writer import (FILES_DDL, OutputError, check_results, commit_chunk, discard_uncommitted,
                                              is_committed)

    sc = spark.sparkContext
    chunks = [table.iloc[i:i + plan.chunk_size] for i in range(0, len(table), plan.chunk_size)]
    pending = [i for i in range(len(chunks)) if not is_committed(work, i)]
    already = sum(len(chunks[i]) for i in range(len(chunks)) if i not in pending)
    committed = len(chunks) - len(pending)
    if already:
        log(f"{len(chunks) - len(pending)} of {len(chunks)} chunks ({already} images) already committed; skipping them")
    done, errors = sc.accumulator(0), sc.accumulator(0)
    start = time.monotonic()
    with Progress(len(table), already, done, errors, plan.progress_interval, plan.stall_timeout,
                  sc.cancelAllJobs) as progress:
        for i in pending:
            chunk = chunks[i][list(INPUT_COLUMNS)].reset_index(drop=True)
            # At least four waves of tasks per core keeps the last wave's idle cores a small share.
            parts = min(len(chunk), max(4 * sc.defaultParallelism, math.ceil(len(chunk) / plan.images_per_task)))
            # The rows travel once per executor as a broadcast and each task takes its share by index: no
            # shuffle, so no stage waits on another and a lost executor takes no shuffle output with it.
            rows = sc.broadcast(chunk)
            task_fn = make_task_fn(embed_fn, rows, parts, work, i, done, errors)
            with stopped_by_store(plan.out, lambda: f"{committed} of {len(chunks)} chunks are committed and kept"):
                discard_uncommitted(work, i)
                try:
                    # collect() keeps one result per partition: a retried or speculative attempt's files are not in it.
                    files = [row.asDict() for row in
                             spark.range(parts, numPartitions=parts).mapInPandas(task_fn, FILES_DDL).collect()]
                except Exception:
                    if progress.stalled:
                        raise OutputError(f"--out {plan.out}: no image finished for {plan.stall_timeout:g} s "
                                          "(--stall-timeout), so the job was stopped as stuck; the committed chunks "
                                          "are kept and a rerun resumes after them") from None
                    raise
                finally:
                    rows.destroy()
                check_results(files)
                if getattr(lock, "lost", False):
                    raise OutputError(f"--out {plan.out}: another job took this store's lock, so this one stops "
                                      "before committing more; the chunks committed so far are kept")
                commit_chunk(work, i, files)
            committed += 1
            log(f"chunk {i + 1}/{len(chunks)} committed; {progress.line()}")
    seconds = time.monotonic() - start
    return {"images_processed": done.value, "seconds": round(seconds, 2),
            "images_per_second": round(done.value / seconds, 2) if done.value else None, "chunks": len(chunks)}


def compact(spark, plan: ExtractPlan, work: str, n_chunks: int) -> dict:
    """Rewrite the committed chunks' files as a few files per split plus the errors file, in Spark tasks that
    read and write through common/fs.py (common/features/compaction.py plans the groups and tallies what the
    tasks wrote); returns the files and the figures for the manifest."""
    from functools import partial

    from common.features.compaction import lung_qa_counts, plan_compaction, precision_ran, rows_per_file, tally_written
    from common.features.feature_stats import constant_note
    from common.features.store_writer import compact_group, read_marker

    markers = [read_marker(work, i) for i in range(n_chunks)]
    ran = precision_ran(markers, plan.out)
    groups = plan_compaction(markers, rows_per_file(plan.file_mb, plan.feature_dim))
    written = (spark.sparkContext.parallelize(groups, max(1, len(groups)))
               .map(partial(compact_group, plan.out, plan.feature_dim)).collect() if groups else [])
    tally = tally_written(written, plan.feature_dim)
    for split, figures in tally["feature_stats"].items():
        if note := constant_note(split, figures):
            log(f"warning: {note}")
    lung_qa = None
    if plan.lungs:
        from lungs.masking import QA_OK

        lung_qa = lung_qa_counts(plan.out, tally["files"], ok=QA_OK)
    return {"files": tally["files"], "splits": tally["splits"], "errors": tally["errors"], "ran": ran,
            "feature_stats": tally["feature_stats"], "lung_qa": lung_qa}


def make_plan(args: argparse.Namespace) -> ExtractPlan:
    """The run's plan from its checked flags, which it never changes: the store's place, the weights (a
    checkpoint read once), the model's input, and for --view masked the lung model, read so that a bad file
    fails here, before anything is written."""
    from common import fs
    from common.features.plan import ExtractPlan
    from common.models.model_registry import get_spec
    from common.models.weights import load_weights, resolve_weights, weights_data_config

    out = args.out
    if fs.is_local(out):
        out = fs.local_path(out)
        check_dir_path(out)
    for flag, value in (("out", out), ("images", args.images), ("test-images", getattr(args, "test_images", None))):
        if value:
            fs.check_location(value, "--" + flag)
    spec = get_spec(args.backbone)
    weights = resolve_weights(args.backbone, args.weights, download=args.download_weights)
    if weights.kind == "random":
        log(f"weights {weights.label}: random initialisation, as asked; the store records it")
    checkpoint = load_weights(weights.path, args.backbone) if weights.kind == "checkpoint" else None
    data_config = weights_data_config(weights, args.backbone, args.input_size, args.resize)
    if checkpoint and checkpoint.data_config and data_config != checkpoint.data_config:
        log("note: --input-size/--resize differ from the checkpoint's own input; these features are not the "
            "ones the fine-tuned model computed")
    # A fine-tuned literature architecture (common/models/architectures.py) gives its pooled pre-classifier features.
    feature_dim = checkpoint.feature_dim if checkpoint and checkpoint.is_architecture else spec.feature_dim
    return ExtractPlan(
        out=out, backbone=args.backbone, model=checkpoint.architecture if checkpoint else "classifier",
        feature_dim=feature_dim, weights=weights, data_config=data_config, device=args.device,
        precision=args.precision, batch_size=args.batch_size, chunk_size=args.chunk_size,
        images_per_task=args.images_per_task, prefetch_batches=args.prefetch_batches, file_mb=args.file_mb,
        max_pixels=args.max_pixels, progress_interval=args.progress_interval, stall_timeout=args.stall_timeout,
        overwrite=args.overwrite, **_lung_settings(args))


def _lung_settings(args: argparse.Namespace) -> dict:
    """--view masked's lung model (lungs.masking.lung_model_source) and --save-masks's folder, checked."""
    from common import fs

    lungs = masks_dir = None
    if args.view == "masked":
        from lungs.masking import lung_model_source

        lungs = lung_model_source(args.lung_model)
    if args.save_masks:
        if args.view != "masked":
            raise ValueError("--save-masks: needs --view masked (an original-view store predicts no masks)")
        if not fs.is_local(args.save_masks):
            raise ValueError(f"--save-masks {args.save_masks}: must be a local (or mounted) folder")
        masks_dir = str(check_dir_path(args.save_masks, "--save-masks").resolve())
    return {"lungs": lungs, "masks_dir": masks_dir}


def main(argv: list[str] | None = None, spark=None, prog: str = PROG) -> dict:
    args = parse_with_config(build_parser(prog), argv, "extract")
    check_table_flags(args)
    require(args, "out")
    plan = make_plan(args)
    from common import fs
    from common.data.image_table import table_from_flags
    from common.features.store_writer import plan_fingerprint, prepare_output

    images = table_from_flags(args, log=log)
    table = images.table
    log(f"{len(table)} images to embed with {plan.backbone} ({plan.weights.label}); "
        + ", ".join(f"{s} {int((table['split'] == s).sum())}" for s in SPLITS))
    if plan.masks_dir:
        Path(plan.masks_dir).mkdir(parents=True, exist_ok=True)
    command = command_line(prog, argv)
    settings = plan.settings()
    # One writer per store for the whole run: two jobs on one --out would write the same chunks.
    with (OutputLock if fs.is_local(plan.out) else RemoteLock)(plan.out, log=log) as lock:
        work = prepare_output(plan.out, plan.overwrite, plan_fingerprint(table, settings), settings, log=log)
        return _embed_and_publish(spark, plan, images, work, lock, flags=vars(args), command=command)


def ship_file(spark, path: str, sha256: str) -> str:
    """Send `path` to the executors (SparkContext.addFile) under a name that holds its content hash, and
    return that name (SparkFiles.get finds it): a session refuses a second, different file of one name,
    so two checkpoints both called best.pt could not be used one after the other."""
    import os
    import shutil
    import tempfile

    name = f"{sha256[:16]}-{Path(path).name}"
    staged = Path(tempfile.gettempdir()) / "cxr-features-shipped" / name  # local: the store may be on S3
    if not staged.exists():
        staged.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(staged) as partial:
            try:
                os.link(path, partial)  # no copy where the file system allows
            except OSError:
                shutil.copyfile(path, partial)
    spark.sparkContext.addFile(str(staged))
    return name


def _embed_and_publish(spark, plan: ExtractPlan, images, work: str, lock, *, flags: dict, command: str) -> dict:
    """Embed the uncommitted chunks, compact them, publish the store with its manifest last."""
    from common.features.extraction import make_embed_fn
    from common.features.manifest import store_manifest
    from common.features.store_writer import publish

    spark = spark or get_spark()
    weights_file = ship_file(spark, plan.weights.path, plan.weights.sha256) if plan.weights.path else None
    make_masker = qa_rule = lung_file = None
    if plan.lungs:
        from lungs.masking import QA_RULE, LungMasker

        # The lung model travels as the weights do.
        lung_file, make_masker, qa_rule = ship_file(spark, plan.lungs["path"], plan.lungs["sha256"]), LungMasker, QA_RULE
    embed_fn = make_embed_fn(plan, weights_file, lung_file, make_masker)
    timing = run_chunks(spark, images.table, work, plan, embed_fn, lock)
    n_chunks = timing["chunks"]
    with stopped_by_store(plan.out, lambda: f"all {n_chunks} chunks are committed and kept"):
        written = compact(spark, plan, work, n_chunks)
    manifest = store_manifest(plan, images, written, flags=flags, command=command, qa_rule=qa_rule)
    with stopped_by_store(plan.out, lambda: f"all {n_chunks} chunks are committed and kept"):
        publish(plan.out, manifest)
    summary = {"store": plan.out, **{k: v for k, v in written.items() if k not in ("ran", "files")}, **timing}
    _report(plan, images, summary)
    return summary


def _report(plan: ExtractPlan, images, summary: dict) -> None:
    """The summary lines of a published store."""
    from common.features.store import ERRORS_DIR

    log(f"store complete: {summary['store']}")
    model = plan.backbone if plan.model == "classifier" else f"{plan.backbone} {plan.model}"
    view = f" of lung-masked images (lung model {plan.lungs['label']})" if plan.lungs else ""
    log(f"  {plan.feature_dim}-d {model} features ({plan.weights.label}){view}; rows per split "
        + ", ".join(f"{s}={n}" for s, n in summary["splits"].items()))
    log(f"  {summary['errors']} unreadable images (see {ERRORS_DIR}/); "
        f"{images.counts.get('images_missing', 0)} metadata rows without an image; "
        f"{images.counts.get('age_dropped', 0)} implausible ages dropped")
    if plan.lungs:
        from lungs.masking import qa_summary

        counts, warning = qa_summary(summary["lung_qa"])
        log(f"  lung masks (QA): {counts}")
        if warning:
            log(f"warning: {warning}")
    if summary["images_processed"]:
        log(f"  this run: {summary['images_processed']} images in {summary['seconds']} s "
            f"({summary['images_per_second']} images/s)")
    log(f"  next: cxr train --store {plan.out} --out runs/<name>")


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
