"""Benchmark: mlp3 head training on synthetic data of full NIH size (112,120 x 2,050, 14 labels).

    python bench/heads_train.py                 # about 2 minutes on 2 cores
    python bench/heads_train.py --epochs 5 --fp32-epochs 0 --dataloader-epochs 1   # quick look
    python bench/heads_train.py --epochs 1 --fp32-epochs 0 --dataloader-epochs 0   # mostly the metrics' cost

Times heads.fit (whole-split tensors indexed by a permutation) for --epochs epochs at the chosen
precision, a few fp32 epochs of the same loop, and a few epochs of a naive torch DataLoader loop
(TensorDataset, shuffle, per-sample fetch + default collate, fp32) on the same data and model.
Each epoch of heads.fit includes its validation pass and val AUROC (11,212 rows). Prints a
Markdown table; peak memory is the process's ru_maxrss.

Then the once-per-run evaluation (common.evaluation.scores.evaluate_splits, what heads.train calls
after the last epoch) on synthetic val and test splits of --metrics-rows rows each (default NIH's
112,120, a bound: its val + test hold 36,808), with the issue-24 metrics (AUPRC, ECE, temperature
fit, operating points with their bootstrap, the PR and reliability plots) timed one by one, and the
evaluation without them (the whole less their sum) beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.evaluation import calibration, operating_points  # noqa: E402
from common.evaluation.metrics import per_class_auprc  # noqa: E402
from common.evaluation.report import plot_pr  # noqa: E402
from common.evaluation.scores import SplitScores, evaluate_splits  # noqa: E402
from heads.fit import FitConfig, Tensors, fit, input_tensor, resolve_precision  # noqa: E402
from common.training.losses import make_loss  # noqa: E402
from heads.models import HeadSpec, build_head  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic(n: int, dim: int, labels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal features; label c (prevalence 1-20%) shifts feature c by 1 so AUROC is meaningful."""
    y = (rng.random((n, labels)) < np.linspace(0.01, 0.2, labels)).astype(np.float32)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x[:, :labels] += y
    return x, y


def naive_epochs(x: np.ndarray, y: np.ndarray, spec: HeadSpec, batch_size: int, epochs: int, loss_fn) -> list[float]:
    """What a first version usually looks like: a DataLoader fetching and collating sample by sample."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = build_head(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size, shuffle=True)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb, torch.ones_like(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _metric_splits(rows: int, labels: int, rng: np.random.Generator) -> dict[str, SplitScores]:
    """val and test with probabilities that carry the labels (NIH-like prevalences), 3 images a patient."""
    out = {}
    for name in ("val", "test"):
        y = (rng.random((rows, labels)) < np.linspace(0.002, 0.18, labels)).astype(np.float32)
        probs = (1 / (1 + np.exp(-(rng.standard_normal((rows, labels)) + 1.5 * y - 2)))).astype(np.float32)
        out[name] = SplitScores(np.array([f"{name}{i}" for i in range(rows)], dtype=object), probs, y,
                                np.ones(y.shape, bool), y.any(axis=1), ~y.any(axis=1), np.arange(rows) // 3)
    return out


def metrics_cost(rows: int, labels: int, draws: int, epoch_seconds: float | None) -> None:
    """The once-per-run evaluation with and without the issue-24 metrics, as a Markdown table."""
    import tempfile

    rng = np.random.default_rng(1)
    splits = _metric_splits(rows, labels, rng)
    names = [f"label{c}" for c in range(labels)]
    val = splits["val"]
    parts = {}
    with tempfile.TemporaryDirectory() as out:
        temperature, parts["temperature fit on val"] = _timed(lambda: calibration.fit_temperature(val.probs, val.y, val.mask))
        _, total = _timed(lambda: evaluate_splits(splits, names, Path(out), draws, calibrate="temperature"))
    both = splits.values()
    _, parts["AUPRC (val + test)"] = _timed(lambda: [per_class_auprc(s.y, s.probs, s.mask, names) for s in both])
    _, parts["ECE raw and T-scaled (val + test)"] = _timed(
        lambda: [calibration.split_calibration(s.y, s.probs, s.mask, names, temperature) for s in both])
    points, chosen = _timed(lambda: operating_points.choose(val.y, val.probs, val.mask, names))
    _, scored = _timed(lambda: [operating_points.score(s.y, s.probs, s.mask, names, points, s.patient_id, draws)
                                for s in both])
    parts[f"operating points: 4 targets chosen on val, scored on val + test ({draws} draws)"] = chosen + scored
    new = sum(parts.values())
    with tempfile.TemporaryDirectory() as folder:
        pred = {"y": val.y, "mask": val.mask, "probs": val.probs}
        _, parts["report: PR + reliability plots (val + test)"] = _timed(lambda: [
            (plot_pr(pred, names, {}, "PR", Path(folder) / "pr.png"),
             calibration.plot_reliability(pred, names, "R", Path(folder) / "r.png", temperature=temperature))
            for _ in range(2)])
    print(f"\n| once per run, {rows:,} x {labels} per split, val + test | seconds |")
    print("| --- | --- |")
    print(f"| evaluate_splits, every metric (what heads.train runs after training) | {total:.2f} |")
    for name, seconds in parts.items():
        print(f"| new: {name} | {seconds:.2f} |")
    print(f"| evaluate_splits without the new metrics (the first row less the new ones inside it) | {total - new:.2f} |")
    if epoch_seconds:
        added = new + parts["report: PR + reliability plots (val + test)"]
        print(f"\nall new metrics, the fit and the plots: {added:.2f} s once per run; one heads.fit epoch above: "
              f"{epoch_seconds:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=112_120)
    p.add_argument("--val-rows", type=int, default=11_212)
    p.add_argument("--dim", type=int, default=2_050)
    p.add_argument("--labels", type=int, default=14)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--fp32-epochs", type=int, default=3, help="epochs of the same loop in fp32 (0: skip)")
    p.add_argument("--dataloader-epochs", type=int, default=2, help="epochs of the naive DataLoader loop (0: skip)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--metrics-rows", type=int, default=112_120, help="rows per split of the evaluation timing (0: skip)")
    p.add_argument("--bootstrap-draws", type=int, default=1000, help="draws of the evaluation timing, as heads.train's")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Process-wide and set by heads.fit too; set here so the DataLoader loop gets it as well
    # (without it Adam's denormal moments make any loop ~30x slower on x86).
    torch.set_flush_denormal(True)
    precision = resolve_precision(args.precision)
    print(f"# {args.rows:,} x {args.dim:,} train, {args.val_rows:,} val, {args.labels} labels; batch {args.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    x, y = synthetic(args.rows, args.dim, args.labels, rng)
    xv, yv = synthetic(args.val_rows, args.dim, args.labels, rng)
    print(f"# synthetic data: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    spec = HeadSpec.make("mlp3", args.dim, args.labels)
    ones, ones_v = torch.ones(args.rows, args.labels), torch.ones(args.val_rows, args.labels)
    loss_fn, _ = make_loss("weighted_bce", torch.from_numpy(y), ones)

    rows, aucs = [], {}
    for prec, epochs in ((precision, args.epochs), ("fp32", args.fp32_epochs if precision != "fp32" else 0)):
        if epochs <= 0:
            continue
        train = Tensors(input_tensor(x, prec), torch.from_numpy(y), ones)
        val = Tensors(input_tensor(xv, prec), torch.from_numpy(yv), ones_v)
        cfg = FitConfig(epochs=epochs, batch_size=args.batch_size, early_stop_patience=0, precision=prec)
        _, result = fit(spec, train, val, loss_fn, cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
        per_epoch = [h["seconds"] for h in result.history]
        rows.append((f"heads.fit: tensors + permutation ({prec})", epochs, np.median(per_epoch), result.seconds,
                     peak_gib()))
        aucs[prec] = [h["val_auc"] for h in result.history]
        del train, val

    if args.dataloader_epochs > 0:
        times = naive_epochs(x, y, spec, args.batch_size, args.dataloader_epochs, loss_fn)
        print("# naive DataLoader epochs: " + ", ".join(f"{t:.1f} s" for t in times), file=sys.stderr)
        rows.append(("naive DataLoader, per-sample + collate (fp32)", args.dataloader_epochs, np.median(times),
                     sum(times), peak_gib()))

    fast = rows[0][2]
    print(f"\n| loop | epochs run | s/epoch (median) | {args.epochs} epochs | vs heads.fit | peak RSS so far |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, run, median, total, peak in rows:
        full = f"{total:.1f} s" if run == args.epochs else f"~{median * args.epochs:.0f} s (projected)"
        print(f"| {name} | {run} | {median:.2f} | {full} | {median / fast:.1f}x | {peak:.2f} GiB |")
    if len(aucs) == 2:  # same seed, same data: precision should not change what is learnt
        k = min(map(len, aucs.values()))
        print(f"\nval mean AUROC after {k} epochs: " + ", ".join(f"{p} {a[k - 1]:.4f}" for p, a in aucs.items())
              + f"; after {len(aucs[precision])} epochs ({precision}): {aucs[precision][-1]:.4f}")
    if args.metrics_rows:
        metrics_cost(args.metrics_rows, args.labels, args.bootstrap_draws, fast)


if __name__ == "__main__":
    main()
