"""Compare finished runs side by side: per-class and mean AUROC with their intervals, and the
settings that differ, as comparison.md and comparison.csv.

    cxr compare runs/original runs/masked runs/fused --out runs/lednet-comparison
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from common.config import HelpFormatter, log, parse_list, settings_of
from common.runs.command import run_command

PROG = "python -m heads.compare"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories of heads.train or jobs/fine_tune.py")
    p.add_argument("--out", required=True, help="folder for comparison.md and comparison.csv")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the split whose scores are compared")
    p.add_argument("--names", help="comma-separated column names, one per run (default: the folders' names)")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    return p


@dataclass(frozen=True)
class CompareSettings:
    """One field per flag; the defaults live in the parser."""

    runs: tuple[str, ...]
    out: str
    split: str
    names: str | None
    overwrite: bool


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Write the comparison of these flags' runs; bad input raises (cli turns it into the one-line exit)."""
    args = settings_of(CompareSettings, build_parser(prog).parse_args(argv))

    from common.evaluation.comparison import TABLE_CSV, TABLE_MD, CompareError, check_comparable, load_run, write_comparison
    from common.runs.safe_output import check_dir_path

    names = parse_list(args.names, str, "names") if args.names else [None] * len(args.runs)
    if len(names) != len(args.runs):
        raise CompareError(f"--names: {len(names)} names for {len(args.runs)} runs")
    out = check_dir_path(args.out)
    if not args.overwrite and any((out / f).exists() for f in (TABLE_MD, TABLE_CSV)):
        raise CompareError(f"--out {out}: holds a comparison already; pass --overwrite to replace it")
    runs = [load_run(Path(r), args.split, n) for r, n in zip(args.runs, names)]
    check_comparable(runs, args.split)
    md, csv = write_comparison(runs, args.split, out)
    log(f"comparison of {len(runs)} runs on {len(runs[0].truth)} {args.split} images: {md} and {csv}")
    return {"markdown": str(md), "csv": str(csv)}


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
