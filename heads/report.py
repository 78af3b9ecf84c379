"""Re-render a run's report.md and plots (a head run or a fine-tune run).

    python -m heads.report --run runs/x
"""

from __future__ import annotations

import argparse

from common import rundir
from common.report import render


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m heads.report", description="Re-render a run's report and plots.")
    p.add_argument("--run", required=True, help="run directory written by heads.train or jobs/finetune.py")
    args = p.parse_args(argv)
    try:
        print(render(args.run))
    except rundir.RunError as exc:
        p.exit(2, f"heads.report: {exc}\n")


if __name__ == "__main__":
    main()
