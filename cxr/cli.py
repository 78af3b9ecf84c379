"""Chest X-ray feature stores, fine-tuning and heads: one command, with a subcommand per job.

    cxr extract --config conf/sample.toml --overwrite    # jobs/extract.py on a local Spark session
    cxr train --store stores/nih-resnet50 --out runs/x
    cxr <command> --help

Each subcommand is its module's own parser and main, imported only when it is chosen (and those
import torch and Spark only once their flags are good), so `cxr --help` and `cxr <command> --help`
answer at once. On a cluster, extraction keeps its route: ./spark-submit.sh jobs/extract.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common.config import HelpFormatter

# name -> (module, entry point taking (argv, prog=...), one line for the listing). Every module has `main`,
# which raises on bad input, and `cli`, main through common.runs.command's one-line exit.
COMMANDS = {
    "extract": ("jobs.extract", "cli", "chest X-ray archive -> Parquet feature store (local Spark)"),
    "finetune": ("jobs.fine_tune", "cli", "fine-tune a backbone end to end; its best.pt feeds extract"),
    "train": ("heads.train", "cli", "train a head on one or several feature stores"),
    "predict": ("heads.predict", "cli", "per-image probabilities from a trained head"),
    "evaluate": ("heads.evaluate", "cli", "a run scored on a store or another labelled table of images"),
    "ensemble": ("heads.ensemble", "cli", "several runs' predictions combined into one run"),
    "report": ("heads.report", "cli", "re-render a run's report.md and plots"),
    "compare": ("heads.compare", "cli", "runs side by side: per-class AUROC, paired tests"),
    "lungs": ("jobs.lung_model", "cli", "lung masks: train a U-Net on image/mask pairs, or score one"),
    "recipe": ("cxr.recipe", "cli", "a labels table's binary task end to end, into results.md"),
    "serve": ("serve.__main__", "cli", "a diagnosis web page and API for one radiograph at a time"),
}


def build_parser() -> argparse.ArgumentParser:
    """The listing `cxr --help` prints; each subcommand parses its own flags."""
    p = argparse.ArgumentParser(prog="cxr", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="`cxr COMMAND --help` lists a command's flags. On a cluster, extract with "
                                       "./spark-submit.sh jobs/extract.py.")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (_, _, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `cxr COMMAND [flags]`; the exit status is the command's (a SystemExit passes through)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        parser.print_help()
        return 0
    if name not in COMMANDS:
        parser.exit(2, f"cxr: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})\n")
    module, entry, _ = COMMANDS[name]
    getattr(importlib.import_module(module), entry)(rest, prog=f"cxr {name}")
    return 0
