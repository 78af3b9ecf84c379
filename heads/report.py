"""Re-render a run's report.md (and plots): a head, fine-tune, evaluation or ensemble run.

    python -m heads.report --run runs/x
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import HelpFormatter, log
from common.runs.command import run_command

PROG = "python -m heads.report"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Re-render a run's report and plots.",
                                formatter_class=HelpFormatter)
    p.add_argument("--run", required=True,
                   help="run directory written by heads.train, jobs/fine_tune.py, heads.evaluate or heads.ensemble")
    return p


def render(run: str | Path) -> Path:
    """report.md of run directory `run`, re-rendered by the command that wrote it (by the marker's kind), and
    the model card of a head, fine-tune or ensemble run."""
    from common.runs import rundir

    run = Path(run)
    marker = rundir.read_marker(run)
    kind = marker.get("kind") if marker else None  # None: a run from before the marker, rendered by its config
    if kind not in (None, "head", "finetune", "evaluation", "ensemble"):
        raise rundir.RunError(f"--run {run}: a {kind} run, whose report its own command writes; cxr report "
                              "re-renders head, finetune, evaluation and ensemble runs")
    if kind in (None, "head", "finetune"):
        from common.evaluation.report import render as render_training  # matplotlib and sklearn: only for a run to render

        path = render_training(run)
    else:
        config, metrics = rundir.read_json(run / rundir.CONFIG), rundir.read_json(run / rundir.METRICS)
        if kind == "evaluation":
            from heads.evaluate import render_report

            text = render_report(config, metrics)
        else:
            from heads.ensemble import render_report

            text = render_report(metrics)
        path = run / rundir.REPORT
        path.write_text(text)
    if kind != "evaluation":  # a head, fine-tune or ensemble run has a model card: re-written with its report
        from common.evaluation.model_card import write_card

        write_card(run)
    return path


def main(argv: list[str] | None = None, prog: str = PROG) -> Path:
    """Re-render the report of --run; bad input raises (cli turns it into the one-line exit)."""
    report = render(build_parser(prog).parse_args(argv).run)
    log(f"report: {report}")
    return report


def cli(argv: list[str] | None = None, prog: str = PROG) -> Path | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
