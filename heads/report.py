"""Re-render a run's report.md and plots (a head run or a fine-tune run).

    python -m heads.report --run runs/x
"""

from __future__ import annotations

import argparse

from common.config import HelpFormatter, fail, log

PROG = "python -m heads.report"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Re-render a run's report and plots.",
                                formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by heads.train or jobs/finetune.py")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # matplotlib and sklearn come with common.report: imported only once there is a run to render.
    from common import rundir
    from common.report import render

    try:
        report = render(args.run)
    except rundir.RunError as exc:
        fail(parser, exc)
    log(f"report: {report}")


if __name__ == "__main__":
    main()
