"""Time of the patient-level bootstrap of AUROC intervals, at a small and at NIH's test-set size.

    .venv/bin/python bench/bootstrap_intervals.py [--draws 1000]

Prints seconds per call for 14 classes at 1,000 images / 400 patients and at 25,596 images /
2,800 patients (NIH ChestX-ray14's official test list), and the ratio to one roc_auc_score
pass over the same data times the draws (what a plain loop would cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.evaluation.bootstrap import bootstrap_auroc  # noqa: E402


def case(n: int, patients: int, k: int, draws: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    y = (rng.random((n, k)) < 0.1).astype(np.float32)
    s = rng.random((n, k)) + 0.5 * y
    pid = rng.integers(0, patients, n).astype(str)
    start = time.perf_counter()
    bootstrap_auroc(y, s, None, pid, draws=draws)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for c in range(k):
        roc_auc_score(y[:, c], s[:, c])
    loop = (time.perf_counter() - start) * draws
    return ours, loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=1000)
    args = p.parse_args()
    for n, patients in ((1000, 400), (25596, 2800)):
        ours, loop = case(n, patients, 14, args.draws)
        print(f"{n:>6} images, {patients:>5} patients, 14 classes, {args.draws} draws: {ours:6.2f} s "
              f"(a roc_auc_score loop: ~{loop:6.1f} s, {loop / ours:.0f}x)")


if __name__ == "__main__":
    main()
