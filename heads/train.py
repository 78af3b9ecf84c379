"""Train a head on one or several feature stores and write a self-describing run directory.

    python -m heads.train --store stores/nih-resnet50 --head mlp3 --loss weighted_bce --out runs/x
    python -m heads.train --config conf/heads.toml --out runs/y --grid-lr 1e-4,3e-4,1e-3 --grid-weight-decay 0,1e-5,1e-4

Settings: built-in defaults < the [train] table of --config < flags. See the README, "Training heads on a feature store".
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch

from common import rundir
from common.config import ConfigError, HelpFormatter, add_loss_flags, log, parse_list, parse_with_config, require
from common.evaluation import SplitScores, evaluate_splits
from common.feature_stats import constant_note, summarize
from common.metadata import study_ids
from common.losses import make_loss
from common.bootstrap import BOOTSTRAP_DRAWS, MIN_VALID_DRAWS
from common.report import render
from common.store import StoreError
from common.targets import POLICIES, apply_policy, eval_targets, finding_flags, label_columns, select_labels
from heads.checkpoint import CHECKPOINT, save_head
from heads.data import SEX_ENCODINGS, fit_inputs, make_inputs, open_stores
from heads.fit import PRECISIONS, FitConfig, Tensors, fit, input_tensor, predict_logits, resolve_precision
from heads.models import KINDS, HeadSpec

GRID_METRICS = ("val_auc", "val_loss")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m heads.train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="TOML file whose [train] table sets defaults for these flags (e.g. conf/heads.toml)")
    a("--store", nargs="+", help="feature store directory; several are fused column-wise")
    a("--out", help="run directory to create")
    a("--overwrite", action="store_true", help="replace an existing run directory at --out")
    g = p.add_argument_group("data")
    g.add_argument("--labels", default="all", help="all | competition (CheXpert's five) | comma-separated names")
    g.add_argument("--keep-no-finding", action="store_true", help="also train on a 'No Finding' label (dropped by default)")
    g.add_argument("--policy", default="ignore", help=f"uncertain (-1) labels: {' | '.join(POLICIES)} (U-Ignore/U-Zeros/U-Ones)")
    g.add_argument("--age-sex", action=argparse.BooleanOptionalAction, default=False,
                   help="append age/100 and sex to the features")
    g.add_argument("--sex-encoding", default="indicator", help=f"{' | '.join(SEX_ENCODINGS)}")
    g = p.add_argument_group("head and loss")
    g.add_argument("--head", default="mlp3", help=f"{' | '.join(KINDS)}")
    g.add_argument("--hidden", default="128,32", help="hidden layer sizes of mlp3, comma-separated")
    g.add_argument("--dropout", type=float, default=None, help="dropout after each hidden layer (mlp3-dropout: 0.5)")
    add_loss_flags(g)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--betas", default="0.9,0.999", help="Adam betas, comma-separated")
    g.add_argument("--batch-size", type=int, default=512, help="images per step")
    g.add_argument("--epochs", type=int, default=50, help="at most this many epochs")
    g.add_argument("--plateau-patience", type=int, default=1, help="ReduceLROnPlateau patience (epochs)")
    g.add_argument("--plateau-factor", type=float, default=0.2, help="ReduceLROnPlateau factor")
    g.add_argument("--early-stop-patience", type=int, default=5, help="epochs without better val loss; 0 = never stop")
    g.add_argument("--grid-lr", default=None, help="comma-separated learning rates: grid search lr x weight decay")
    g.add_argument("--grid-weight-decay", default=None, help="comma-separated weight decays for the grid")
    g.add_argument("--grid-metric", default="val_auc", help="pick the grid cell by val_auc (max) or val_loss (min)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS,
                   help=f"patient-level bootstrap draws for the val/test AUROC 95%% intervals (seed 0); "
                        f"0 = no intervals, else at least {MIN_VALID_DRAWS}")
    g = p.add_argument_group("machine")
    # Not --seed, which names the split seed in the jobs.
    g.add_argument("--init-seed", type=int, default=0, help="weight init, dropout and batch order")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    g.add_argument("--precision", default="auto",
                   help="auto (bf16 matmuls on a CPU with native bf16, else fp32) | fp32 | bf16")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    return p


def settings_from(args: argparse.Namespace) -> dict:
    """Validated, normalized settings: what config.json records and the run is made from."""
    s = {k: v for k, v in vars(args).items() if k != "config"}
    require(args, "store", "out")
    s["store"] = [s["store"]] if isinstance(s["store"], str) else list(s["store"])
    s["hidden"] = parse_list(s["hidden"], int, "hidden")
    s["betas"] = parse_list(s["betas"], float, "betas")
    s["grid_lr"] = parse_list(s["grid_lr"], float, "grid-lr")
    s["grid_weight_decay"] = parse_list(s["grid_weight_decay"], float, "grid-weight-decay")
    checks = [("policy", POLICIES), ("sex_encoding", SEX_ENCODINGS), ("head", KINDS), ("precision", PRECISIONS),
              ("grid_metric", GRID_METRICS)]
    for key, allowed in checks:
        if s[key] not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {s[key]!r}: choose from {', '.join(allowed)}")
    if len(s["betas"]) != 2:
        raise ConfigError(f"--betas {s['betas']}: give two values")
    if s["batch_size"] < 1 or s["epochs"] < 1:
        raise ConfigError("--batch-size and --epochs must be positive")
    if s["bootstrap_draws"] != 0 and s["bootstrap_draws"] < MIN_VALID_DRAWS:
        raise ConfigError(f"--bootstrap-draws {s['bootstrap_draws']}: 0 (no intervals) or at least {MIN_VALID_DRAWS}")
    return s


@dataclass
class Prepared:
    label_names: list[str]
    tensors: dict[str, Tensors]
    ids: dict[str, np.ndarray]
    patients: dict[str, np.ndarray]  # split -> patient_id per image, the unit of the AUROC bootstrap
    flags: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (has_disease, no_finding)
    truth: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> raw (y, mask): what metrics score, whatever the policy
    inputs: object  # InputSpec
    stores: list[dict]
    dataset: str


def prepare_data(s: dict, precision: str) -> Prepared:
    stores = open_stores(s["store"])
    for need in ("train", "val"):
        if need not in stores.splits:
            raise StoreError(f"{s['store'][0]}: has no split={need}; training needs train and val")
    # Constant features make every head score 0.5 and look like a result: refuse them.
    if note := constant_note("train", summarize(stores.splits["train"].features)):
        raise StoreError(f"{', '.join(s['store'])}: {note}")
    chosen = select_labels(stores.label_names, s["labels"], drop_no_finding=not s["keep_no_finding"])
    cols = label_columns(stores.label_names, chosen)
    inputs = fit_inputs(stores.splits["train"], stores.feature_dims, s["age_sex"], s["sex_encoding"])
    tensors, ids, patients, flags, truth = {}, {}, {}, {}, {}
    for name in list(stores.splits):
        split = stores.splits.pop(name)  # drop each split's store arrays once its inputs exist
        x = make_inputs(split.features, split.age, split.sex, inputs)
        y, mask = apply_policy(split.labels[:, cols], s["policy"])
        truth[name] = eval_targets(split.labels[:, cols])
        tensors[name] = Tensors(input_tensor(x, precision), torch.from_numpy(y), torch.from_numpy(mask.astype(np.float32)))
        ids[name] = split.image_id
        patients[name] = split.patient_id
        flags[name] = finding_flags(split.labels, stores.label_names)
        del split, x
    return Prepared(chosen, tensors, ids, patients, flags, truth, inputs, [i.describe() for i in stores.infos], stores.dataset)


def _score(cell: dict, metric: str) -> float:
    """Larger is better; a NaN cell never wins."""
    value = cell["val_auc"] if metric == "val_auc" else -cell["val_loss"]
    return value if value is not None and math.isfinite(value) else -math.inf


def train_grid(s: dict, data: Prepared, spec: HeadSpec, loss_fn, precision: str):
    """Fit every lr x weight-decay cell (one cell without a grid); keep the best by the grid metric."""
    lrs = s["grid_lr"] or [s["lr"]]
    wds = s["grid_weight_decay"] or [s["weight_decay"]]
    cells, best = [], None
    quiet = (lambda line: None) if s["quiet"] else log
    for i, (lr, wd) in enumerate(itertools.product(lrs, wds), 1):
        if len(lrs) * len(wds) > 1:
            log(f"grid cell {i}/{len(lrs) * len(wds)}: lr {lr:g}, weight decay {wd:g}")
        cfg = FitConfig(lr=lr, weight_decay=wd, betas=tuple(s["betas"]), batch_size=s["batch_size"],
                        epochs=s["epochs"], plateau_patience=s["plateau_patience"], plateau_factor=s["plateau_factor"],
                        early_stop_patience=s["early_stop_patience"], seed=s["init_seed"], precision=precision)
        model, result = fit(spec, data.tensors["train"], data.tensors["val"], loss_fn, cfg, log=quiet,
                            val_truth=data.truth["val"])
        cell = {"lr": lr, "weight_decay": wd, "best_epoch": result.best_epoch, "val_loss": result.best_val_loss,
                "val_auc": result.best_val_auc, "epochs_run": len(result.history), "stopped": result.stopped,
                "seconds": round(result.seconds, 2)}
        cells.append(cell)
        if best is None or _score(cell, s["grid_metric"]) > _score(best[0], s["grid_metric"]):
            best = (cell, model, result)
    return cells, best


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    try:
        s = settings_from(parse_with_config(parser, argv, "train"))
        out = rundir.prepare(s["out"], s["overwrite"])
    except (ConfigError, rundir.RunError) as exc:
        parser.exit(2, f"heads.train: {exc}\n")
    threads = torch.get_num_threads()
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    try:
        return _run(parser, argv, s, out)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its own setting


def evaluate_run(data: Prepared, model, precision: str, out: Path, bootstrap_draws: int = BOOTSTRAP_DRAWS
                 ) -> tuple[dict, np.ndarray, list[str]]:
    """Thresholds chosen on val, every metric on val and test, and their predictions files."""
    scores = {}
    for name, t in data.tensors.items():
        if name == "train":
            continue
        probs = torch.sigmoid(predict_logits(model, t.x, precision)).numpy()
        scores[name] = SplitScores(data.ids[name], probs, *data.truth[name], *data.flags[name], data.patients[name],
                                   study_ids(data.dataset, data.ids[name]))
    return evaluate_splits(scores, data.label_names, out, bootstrap_draws)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, s: dict, out: Path) -> dict:
    started = dt.datetime.now(dt.timezone.utc)
    precision = resolve_precision(s["precision"])
    try:
        data = prepare_data(s, precision)
        spec = HeadSpec.make(s["head"], data.inputs.width, len(data.label_names), s["hidden"], s["dropout"])
        train = data.tensors["train"]
        loss_fn, notes = make_loss(s["loss"], train.y, train.mask, s["focal_gamma"], s["focal_alpha"], data.label_names)
    except (StoreError, ValueError) as exc:
        parser.exit(2, f"heads.train: {exc}\n")
    log(f"{len(train)} train / {len(data.tensors['val'])} val images, {data.inputs.width} inputs, "
        f"{len(data.label_names)} labels; {spec.describe()}; loss {s['loss']}; {precision}")

    cells, (chosen, model, result) = train_grid(s, data, spec, loss_fn, precision)
    if result.best_epoch == 0:
        parser.exit(2, f"heads.train: training diverged in its first epoch (non-finite loss); no weights worth "
                       f"saving in {out}; lower --lr or check the store's features\n")
    splits, thresholds, threshold_notes = evaluate_run(data, model, precision, out, s["bootstrap_draws"])

    save_head(out / CHECKPOINT, model, spec, data.inputs, data.label_names, data.stores, thresholds,
                     precision, s["policy"], data.dataset, s)
    rundir.write_json(out / rundir.CONFIG, {
        "settings": s,
        "precision_resolved": precision,
        "head": spec.to_dict(),
        "label_names": data.label_names,
        "dataset": data.dataset,
        "stores": data.stores,
        "input_width": data.inputs.width,
        "command": shlex.join(["python", "-m", "heads.train", *(sys.argv[1:] if argv is None else argv)]),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
                     "python": sys.version.split()[0]},
    })
    rundir.write_json(out / rundir.METRICS, {
        "label_names": data.label_names,
        "selected": {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"], "grid_metric": s["grid_metric"]},
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "train_seconds": round(sum(c["seconds"] for c in cells), 2),
        "history": result.history,
        "grid": cells if len(cells) > 1 else [],
        "thresholds": dict(zip(data.label_names, thresholds)),
        "splits": splits,
        "notes": notes + threshold_notes + [n for m in splits.values() for n in m["notes"]],
    })
    render(out)
    summary = {"run": str(out), **{f"{k}_mean_auc": v["summary"]["mean_auc"] for k, v in splits.items()}}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
