"""Compare finished runs side by side: per-class and mean AUROC with their intervals, the settings
that differ, and each run paired against a reference (DeLong's test, paired bootstrap intervals), as
comparison.md, comparison.csv and comparison_paired.csv; the paired table is also printed.

    cxr compare runs/original runs/masked runs/fused --out runs/lednet-comparison
    cxr compare runs/a runs/b --reference b --bootstrap-draws 2000 --out runs/a-vs-b
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from common.config import HelpFormatter, log, parse_list, settings_of
from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, MIN_VALID_DRAWS, check_draws
from common.runs.command import run_command

PROG = "python -m heads.compare"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories of heads.train or jobs/fine_tune.py")
    p.add_argument("--out", required=True, help="folder for comparison.md, comparison.csv and comparison_paired.csv")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the split whose scores are compared")
    p.add_argument("--names", help="comma-separated column names, one per run (default: the folders' names)")
    p.add_argument("--reference", metavar="NAME",
                   help="the run (by its name) every other run is paired against (default: the first)")
    p.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS,
                   help=f"paired patient-level bootstrap draws for the intervals of the differences; 0: none, else at "
                        f"least {MIN_VALID_DRAWS}")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    return p


@dataclass(frozen=True)
class CompareSettings:
    """One field per flag; the defaults live in the parser."""

    runs: tuple[str, ...]
    out: str
    split: str
    names: str | None
    reference: str | None
    bootstrap_draws: int
    overwrite: bool


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Write the comparison of these flags' runs; bad input raises (cli turns it into the one-line exit)."""
    args = settings_of(CompareSettings, build_parser(prog).parse_args(argv))
    check_draws(args.bootstrap_draws)

    from common.evaluation.comparison import (PAIRED_CSV, TABLE_CSV, TABLE_MD, CompareError, check_comparable, load_run,
                                              paired_comparison, paired_lines, reference_run, write_comparison)
    from common.runs.safe_output import check_dir_path

    names = parse_list(args.names, str, "names") if args.names else [None] * len(args.runs)
    if len(names) != len(args.runs):
        raise CompareError(f"--names: {len(names)} names for {len(args.runs)} runs")
    out = check_dir_path(args.out)
    if not args.overwrite and any((out / f).exists() for f in (TABLE_MD, TABLE_CSV, PAIRED_CSV)):
        raise CompareError(f"--out {out}: holds a comparison already; pass --overwrite to replace it")
    runs = [load_run(Path(r), args.split, n) for r, n in zip(args.runs, names)]
    check_comparable(runs, args.split)
    reference_run(runs, args.reference)  # a --reference that names no run is refused before any work
    paired = paired_comparison(runs, args.reference, args.bootstrap_draws)
    md, csv, paired_csv = write_comparison(runs, args.split, out, paired)
    print("\n".join(paired_lines(paired, args.split)).strip("\n"), flush=True)
    log(f"comparison of {len(runs)} runs on {len(runs[0].truth)} {args.split} images: {md}, {csv} and {paired_csv}")
    return {"markdown": str(md), "csv": str(csv), "paired_csv": str(paired_csv)}


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
