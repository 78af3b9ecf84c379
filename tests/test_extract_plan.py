"""The extraction job's typed plan, the factory of a task's models and the pure side of compaction and the
manifest (common/features/): without Spark."""

import pickle
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.features.feature_stats import RunningStats
from common.features.store_writer import OutputError
from jobs.extract import build_parser, make_plan
from tests.data_paths import SAMPLE

NAME = "mobilenet_v3_large"


def checked_flags(*extra):
    return build_parser().parse_args(["--metadata", str(SAMPLE / "Data_Entry_2017_v2020.csv"),
                                      "--images", str(SAMPLE / "images"), "--backbone", NAME, *extra])


def test_the_plan_is_made_once_from_the_flags_frozen_and_picklable(tmp_path):
    args = checked_flags("--out", f"file://{tmp_path}/store", "--weights", "random:3", "--batch-size", "8")
    flags = dict(vars(args))
    plan = make_plan(args)
    assert vars(args) == flags  # the flags are read, never written back
    assert (plan.out, plan.model, plan.feature_dim, plan.batch_size) == (str(tmp_path / "store"), "classifier", 1280, 8)
    assert plan.weights.label == "random:3" and plan.view == "original" and plan.lungs is None
    assert pickle.loads(pickle.dumps(plan)) == plan
    with pytest.raises(FrozenInstanceError):
        plan.batch_size = 16


def test_the_manifest_records_every_flag_with_the_resolved_store_and_model(tmp_path):
    from common.data.image_table import table_from_flags
    from common.features.manifest import store_manifest

    args = checked_flags("--out", f"file://{tmp_path}/store", "--weights", "random:3", "--chunk-size", "16")
    flags = dict(vars(args))
    plan = make_plan(args)
    written = {"files": {"train": ["split=train/part-0.parquet"]}, "splits": {"train": 30, "val": 5, "test": 5},
               "errors": 0, "ran": "cpu/bf16", "feature_stats": {}, "lung_qa": None}
    manifest = store_manifest(plan, table_from_flags(args), written, flags=flags, command="jobs/extract.py ...")
    assert manifest["config"] == dict(sorted({**flags, "out": str(tmp_path / "store"), "model": "classifier",
                                              "feature_dim": 1280}.items()))
    assert (manifest["device"], manifest["precision"], manifest["precision_requested"]) == ("cpu", "bf16", "auto")
    assert manifest["weights_note"].startswith("random initialisation") and "lungs" not in manifest


def sample_frames(n=3):
    from common.data.image_table import table_from_flags
    from common.features.extraction import INPUT_COLUMNS

    table = table_from_flags(checked_flags("--out", "unused")).table
    return [table[list(INPUT_COLUMNS)].iloc[:n]]


def test_a_worker_builds_a_plans_models_once_found_by_the_drivers_key(tmp_path):
    from common.features.extraction import make_embed_fn

    plan = make_plan(checked_flags("--out", str(tmp_path / "s"), "--weights", "random:0", "--input-size", "64",
                                   "--device", "cpu"))
    first = make_embed_fn(plan)("0", 1)  # a GPU the task was given is not used with --device cpu
    assert first.extractor.device.type == "cpu" and first.ran.startswith("cpu/")
    assert make_embed_fn(plan)(None, 1).extractor is first.extractor  # a later task in this worker
    # Another run whose models are the same (only the batch differs) reuses them, with its own batch size.
    again = make_embed_fn(replace(plan, batch_size=2))(None, 1)
    assert again.extractor is first.extractor and again.plan.batch_size == 2
    rows = again(sample_frames(3))
    assert len(rows) == 3 and all(len(f) == plan.feature_dim for f in rows["features"])
    other = make_embed_fn(replace(plan, precision="fp32"))(None, 1)
    assert other.extractor is not first.extractor and other.ran == "cpu/fp32"
    assert again([]) is None


def test_tasks_shipped_as_spark_ships_them_share_their_workers_models(tmp_path):
    """Spark pickles the task's function anew for each task (closures and the globals they name by value): the
    models must still be found again, not rebuilt in every task (a copied cache dict once made them so)."""
    from pyspark import cloudpickle

    from common.features.extraction import make_embed_fn

    plan = make_plan(checked_flags("--out", str(tmp_path / "s"), "--weights", "random:0", "--input-size", "64"))
    shipped = cloudpickle.dumps(make_embed_fn(plan))
    first, second = (cloudpickle.loads(shipped)(None, 1) for _ in range(2))
    assert second.extractor is first.extractor


def test_the_lung_model_is_built_beside_the_backbone_from_the_shipped_file(tmp_path):
    from common.features.extraction import make_embed_fn

    plan = make_plan(checked_flags("--out", str(tmp_path / "s"), "--weights", "random:0", "--input-size", "64"))
    plan = replace(plan, lungs={"path": "/driver/lungs.pt", "label": "default"}, masks_dir=str(tmp_path / "m"))
    built = []
    embed = make_embed_fn(plan, lung_file="abc-lungs.pt", make_masker=lambda *a: built.append(a) or "masker")(
        None, 1, locate=lambda name: f"/worker/{name}")
    assert embed.masker == "masker" and built == [("/worker/abc-lungs.pt", "cpu", str(tmp_path / "m"))]
    assert plan.view == "masked" and plan.lung_model == {"label": "default"}


def test_chunks_embedded_on_two_devices_or_precisions_are_refused_naming_both():
    from common.features.compaction import precision_ran

    marker = lambda *ran: {"files": [{"kind": "train", "file": f"f{i}", "rows": 2, "ran": r} for i, r in enumerate(ran)]}
    assert precision_ran([marker("cpu/bf16", "cpu/bf16"), marker("cpu/bf16")], "s") == "cpu/bf16"
    assert precision_ran([marker()], "s") is None
    with pytest.raises(OutputError, match=r"^s: the chunks were embedded on different devices/precisions "
                                          r"\(cpu/bf16: 2 images, cuda/fp16: 4 images\)"):
        precision_ran([marker("cuda/fp16", "cuda/fp16"), marker("cpu/bf16")], "s")


def test_what_the_compaction_tasks_wrote_becomes_the_manifests_files_counts_and_statistics():
    from common.features.compaction import tally_written

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    written = [{"kind": "train", "file": "split=train/part-00001-x.parquet", "rows": 3, "stats": RunningStats(4).add(b)},
               {"kind": "errors", "file": "errors/part-00000-y.parquet", "rows": 2, "stats": None},
               {"kind": "train", "file": "split=train/part-00000-z.parquet", "rows": 5, "stats": RunningStats(4).add(a)}]
    out = tally_written(written, 4)
    assert out["files"] == {"train": ["split=train/part-00000-z.parquet", "split=train/part-00001-x.parquet"],
                            "val": [], "test": [], "errors": ["errors/part-00000-y.parquet"]}
    assert out["splits"] == {"train": 8, "val": 0, "test": 0} and out["errors"] == 2
    assert out["feature_stats"].keys() == {"train"}
    assert out["feature_stats"]["train"] == pytest.approx(RunningStats(4).add(np.concatenate([a, b])).summary())


def test_lung_qa_counts_read_a_row_without_a_flag_as_ok(tmp_path):
    from common.features.compaction import lung_qa_counts

    (tmp_path / "split=train").mkdir()
    pq.write_table(pa.table({"lung_qa": ["ok", None, "empty", "ok"]}), tmp_path / "split=train" / "p.parquet")
    files = {"train": ["split=train/p.parquet"], "val": [], "test": [], "errors": []}
    assert lung_qa_counts(str(tmp_path), files, ok="ok") == {"ok": 3, "empty": 1}
    assert lung_qa_counts(str(tmp_path), {"train": [], "val": [], "test": []}, ok="ok") == {}


def test_a_compaction_task_the_store_failed_stops_the_run_before_its_rows_are_dropped():
    from common.features.compaction import tally_written
    from common.features.store_writer import StoreFailure, failure_row

    written = [{"kind": "train", "file": "split=train/part-00000-z.parquet", "rows": 5,
                "stats": RunningStats(4).add(np.ones((5, 4)))},
               {**failure_row(OSError("No space left on device (a task)")), "stats": None}]
    # Published without it, the store would lack that group's rows, and publishing deletes the chunks they were in.
    with pytest.raises(StoreFailure, match="No space left on device"):
        tally_written(written, 4)
