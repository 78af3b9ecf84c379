"""An ensemble of five heads' predictions over a full NIH-size store (112,120 synthetic images), timed.

    .venv/bin/python bench/ensemble.py [--members 5] [--val 11212] [--test 100908]

Writes five member run directories whose val and test predictions are a planted truth plus each
member's own noise (14 labels, NIH's prevalence-like 10%), then times heads.ensemble end to end
(reading, checking images and ground truth, combining, thresholds, metrics, predictions, report),
without and with the default 1,000-draw bootstrap; prints seconds, images per second, and the
ensemble's test mean AUROC beside its members'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.runs import rundir  # noqa: E402
from common.data.labels import NIH_LABELS  # noqa: E402
from heads import ensemble  # noqa: E402


def write_member(root: Path, name: str, truth: dict, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    out = rundir.prepare(root / name, overwrite=False, kind="head", log=lambda m: None)
    for split, y in truth.items():
        probs = 1 / (1 + np.exp(-(1.5 * y - 0.75 + rng.normal(0, 1.5, y.shape))))
        frame = rundir.predictions_frame([f"{split}_{i:06d}" for i in range(len(y))], probs, list(NIH_LABELS), y,
                                         np.ones_like(y, bool), y.any(1), ~y.any(1))
        rundir.write_table(frame, out / rundir.PREDICTIONS / f"{split}.parquet")
    rundir.write_json(out / rundir.METRICS, {"label_names": list(NIH_LABELS), "splits": {}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--val", type=int, default=11212)
    p.add_argument("--test", type=int, default=100908)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    truth = {s: (rng.random((n, len(NIH_LABELS))) < 0.1).astype(np.float32) for s, n in (("val", args.val),
                                                                                          ("test", args.test))}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        members = [str(write_member(root, f"m{i}", truth, i + 1)) for i in range(args.members)]
        n = args.val + args.test
        print(f"{args.members} members x {n:,} images (val {args.val:,}, test {args.test:,}) x {len(NIH_LABELS)} labels",
              flush=True)
        for draws in (0, 1000):
            start = time.perf_counter()
            summary = ensemble.main([*members, "--out", str(root / f"ens{draws}"), "--bootstrap-draws", str(draws)])
            seconds = time.perf_counter() - start
            print(f"bootstrap draws {draws:>4}: {seconds:.2f} s ({n * args.members / seconds:,.0f} member predictions/s); "
                  f"test mean AUROC {summary['test_mean_auc']:.4f}", flush=True)
        from sklearn.metrics import roc_auc_score
        import pandas as pd

        single = pd.read_parquet(Path(members[0]) / "predictions" / "test.parquet")
        auc = np.mean([roc_auc_score(truth["test"][:, j], single[name]) for j, name in enumerate(NIH_LABELS)])
        print(f"one member's test mean AUROC: {auc:.4f}")


if __name__ == "__main__":
    main()
