"""One head run, from checked settings to its run directory: the stores' arrays as tensors, a grid
of fits (one cell without a grid), val and test scored, then head.pt, config.json, metrics.json
and the report. heads/train.py parses and checks the flags into a HeadSettings, then calls `run`,
whose errors it reports: the engine raises and never sees the parser.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common import software
from common.runs import rundir
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS
from common.config import log
from common.evaluation.operating_points import DEFAULT_TARGETS
from common.evaluation.scores import evaluate_splits, split_scores
from common.evaluation.age_bands import AGE_BANDS
from common.evaluation.subgroups import image_groups, source_name
from common.features.feature_stats import constant_note, summarize
from common.training.losses import loss_text
from common.evaluation.report import render
from common.evaluation.model_card import label_counts, write_card
from common.features.store import StoreError
from common.data.targets import apply_policy, eval_targets, label_columns, select_labels
from heads.checkpoint import CHECKPOINT, save_head
from heads.data import fit_inputs, make_inputs, open_stores
from heads.fit import Tensors, input_tensor, predict_logits, resolve_precision
from heads.grid import policy_loss, train_grid
from heads.models import HeadSpec
from heads.selftrain import self_train
from heads.settings import HeadSettings


@dataclass
class Prepared:
    label_names: list[str]
    tensors: dict[str, Tensors]
    ids: dict[str, np.ndarray]
    patients: dict[str, np.ndarray]  # split -> patient_id per image, the unit of the AUROC bootstrap
    labels: dict[str, np.ndarray]  # split -> the store's raw labels, every column (store_labels): what is scored
    truth: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> raw (y, mask) of label_names, whatever the policy
    inputs: object  # InputSpec
    stores: list[dict]
    dataset: str
    store_labels: tuple[str, ...]
    groups: dict[str, dict[str, np.ndarray]]  # split -> who each image is (sex, age, view, source), for subgroups


def prepare_data(s: HeadSettings, precision: str) -> Prepared:
    stores = open_stores(s.store)
    for need in ("train", "val"):
        if need not in stores.splits:
            raise StoreError(f"{s.store[0]}: has no split={need}; training needs train and val")
    # Constant features make every head score 0.5 and look like a result: refuse them.
    if note := constant_note("train", summarize(stores.splits["train"].features)):
        raise StoreError(f"{', '.join(s.store)}: {note}")
    chosen = select_labels(stores.label_names, s.labels, drop_no_finding=not s.keep_no_finding)
    cols = label_columns(stores.label_names, chosen)
    inputs = fit_inputs(stores.splits["train"], stores.feature_dims, s.age_sex, s.sex_encoding)
    tensors, ids, patients, labels, truth, groups = {}, {}, {}, {}, {}, {}
    source = source_name(stores.infos[0].manifest["dataset"], stores.infos[0].manifest.get("config"))
    for name in list(stores.splits):
        split = stores.splits.pop(name)  # drop each split's store arrays once its inputs exist
        x = make_inputs(split.features, split.age, split.sex, inputs)
        y, mask = apply_policy(split.labels[:, cols], s.policy)
        truth[name] = eval_targets(split.labels[:, cols])
        tensors[name] = Tensors(input_tensor(x, precision), torch.from_numpy(y), torch.from_numpy(mask.astype(np.float32)))
        ids[name], patients[name], labels[name] = split.image_id, split.patient_id, split.labels
        groups[name] = image_groups(len(split), split.sex, split.age, split.view, source)
        del split, x
    return Prepared(chosen, tensors, ids, patients, labels, truth, inputs, [i.describe() for i in stores.infos],
                    stores.dataset, tuple(stores.label_names), groups)


def run(settings: HeadSettings, out: Path, command: str) -> dict:
    """Train and evaluate the head of `settings` into the prepared run directory `out`; `command` is
    recorded. Bad stores and a diverged fit raise ValueErrors (StoreError, RunError) for the caller to
    report: heads.train turns them into its one-line exit."""
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, out, command)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its own setting


def evaluate_run(data: Prepared, model, precision: str, out: Path, bootstrap_draws: int = BOOTSTRAP_DRAWS,
                 calibrate: str = "none", targets=DEFAULT_TARGETS,
                 age_bands=AGE_BANDS) -> tuple[dict, np.ndarray, list[str]]:
    """Thresholds and operating points chosen on val, with --calibrate temperature the temperatures
    fitted on val (calibration.json), every metric on val and test, and their predictions files."""
    scores = {}
    for name, t in data.tensors.items():
        if name == "train":
            continue
        probs = torch.sigmoid(predict_logits(model, t.x, precision)).numpy()
        scores[name] = split_scores(data.ids[name], probs, data.labels[name], data.store_labels, data.label_names,
                                    data.patients[name], data.dataset, data.groups[name])
    return evaluate_splits(scores, data.label_names, out, bootstrap_draws, calibrate=calibrate, targets=targets,
                           age_bands=age_bands)


def _run(s: HeadSettings, out: Path, command: str) -> dict:
    started = dt.datetime.now(dt.timezone.utc)
    precision = resolve_precision(s.precision)
    data = prepare_data(s, precision)
    spec = HeadSpec.make(s.head, data.inputs.width, len(data.label_names), s.hidden, s.dropout,
                         outputs_per_label=3 if s.policy == "multiclass" else 1)
    train = data.tensors["train"]
    loss_fn, notes = policy_loss(s, train.y, train.mask, data.label_names)
    settings = s.to_dict()  # what config.json and head.pt record
    log(f"{len(train)} train / {len(data.tensors['val'])} val images, {data.inputs.width} inputs, "
        f"{len(data.label_names)} labels; {spec.describe()}; loss {loss_text(settings)}; {precision}")

    cells, (chosen, model, result) = train_grid(s, data, spec, loss_fn, precision)
    rounds = []
    if s.policy == "selftrained" and result.best_epoch:
        cells, (chosen, model, result), rounds = self_train(s, data, spec, model, precision, cells, (chosen, model, result))
    if result.best_epoch == 0:
        raise rundir.RunError(f"training diverged in its first epoch (non-finite loss); no weights worth saving in "
                              f"{out}; lower --lr or check the store's features")
    splits, thresholds, threshold_notes = evaluate_run(data, model, precision, out, s.bootstrap_draws, s.calibrate,
                                                       s.operating_point, age_bands=s.age_bands)

    if s.grid_ensemble > 1:
        spec = replace(spec, members=s.grid_ensemble)
    save_head(out / CHECKPOINT, model, spec, data.inputs, data.label_names, data.stores, thresholds,
              precision, s.policy, data.dataset, settings)
    rundir.write_json(out / rundir.CONFIG, {
        "settings": settings,
        "precision_resolved": precision,
        "head": spec.to_dict(),
        "label_names": data.label_names,
        "dataset": data.dataset,
        "stores": data.stores,
        "images": {name: len(t) for name, t in data.tensors.items()},
        # The training split's truth is in no predictions file: its counts, for the model card's prevalence.
        "label_counts": {"train": label_counts(*data.truth["train"], data.label_names)},
        "input_width": data.inputs.width,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software("torch", "numpy", "scikit-learn"),
    })
    rundir.write_json(out / rundir.METRICS, {
        "label_names": data.label_names,
        "selected": {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"], "grid_metric": s.grid_metric},
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "train_seconds": round(sum(c["seconds"] for c in cells), 2),
        "history": result.history,
        "grid": cells if len(cells) > 1 and not rounds else [],
        **({"self_training": rounds} if rounds else {}),
        "thresholds": dict(zip(data.label_names, thresholds)),
        "splits": splits,
        "notes": notes + threshold_notes + [n for m in splits.values() for n in m["notes"]],
    })
    render(out)
    write_card(out)
    summary = {"run": str(out), **{f"{k}_mean_auc": v["summary"]["mean_auc"] for k, v in splits.items()}}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary
