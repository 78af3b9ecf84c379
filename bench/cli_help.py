"""Benchmark: seconds from start to exit of `--help`, for every command line of the project.

    python bench/cli_help.py                 # this checkout, 5 runs per command line
    python bench/cli_help.py --tree DIR      # another checkout, e.g. `git archive REV | tar -x -C DIR`

--help only builds a parser and exits, so its time is the interpreter's start plus what the
command imports before parsing. Prints a Markdown table: this run's median beside the figures
measured before and after the parsers stopped importing torch, torchvision, pyspark, sklearn and
matplotlib at module level (`cxr` is new; `python jobs/finetune.py` failed on an import before:
jobs/finetune.py shadowed the finetune package, so `python -m jobs.finetune` was timed instead; the
file is jobs/fine_tune.py since).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# command line after `python` -> (before, after) in seconds, median of 5 runs on this project's
# 2-core AMD EPYC, Python 3.11, torch 2.14.1, pyspark 4.3.0; the interpreter alone starts in 0.03 s.
MEASURED = {
    "-m cxr --help": (None, 0.04),
    "-m cxr extract --help": (None, 0.11),
    "-m cxr finetune --help": (None, 0.10),
    "-m cxr train --help": (None, 0.09),
    "-m cxr predict --help": (None, 0.03),
    "-m cxr report --help": (None, 0.03),
    "jobs/extract.py --help": (3.24, 0.11),
    "jobs/fine_tune.py --help": (4.22, 0.11),  # before: python -m jobs.finetune --help
    "-m heads.train --help": (4.32, 0.09),
    "-m heads.predict --help": (3.86, 0.03),
    "-m heads.report --help": (1.38, 0.03),
}


def seconds(line: str, tree: Path, runs: int) -> float | None:
    """Median wall time of `python LINE` run in `tree` with its packages first on the path; None: it failed."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = line.split()
    if args[0] == "jobs/fine_tune.py" and not (tree / args[0]).is_file():
        args[0] = "jobs/finetune.py"  # its name in a tree from before the rename
    if not (tree / "cxr").is_dir():  # a tree from before the cxr command
        if args[:2] == ["-m", "cxr"]:
            return None
        if args[0] == "jobs/finetune.py":
            args = ["-m", "jobs.finetune", *args[1:]]  # its script form failed on an import
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            return None
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=REPO, help="checkout whose command lines to time (default: this one)")
    p.add_argument("--runs", type=int, default=5, help="runs per command line; the median is shown")
    args = p.parse_args()

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(f"| `python ...` | before (s) | after (s) | this run, {args.tree} (s) |")
    print("| --- | --- | --- | --- |")
    for line, (before, after) in MEASURED.items():
        print(f"| `{line}` | {cell(before)} | {cell(after)} | {cell(seconds(line, args.tree.resolve(), args.runs))} |")


if __name__ == "__main__":
    main()
