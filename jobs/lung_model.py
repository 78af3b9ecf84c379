"""Lung segmentation: train a compact U-Net on image/mask pairs, or score a model on them.

    python jobs/lung_model.py train --images shenzhen/images --masks shenzhen/masks --out runs/lungs
    python jobs/lung_model.py evaluate --model default --images DIR --masks DIR --out runs/lungs-eval

Images and masks pair by file stem. Both write a run directory (config.json, metrics.json with
per-image and mean Dice/IoU before and after post-processing, report.md with overlays); train also
writes best.pt, which `--model` (and lungs.model.load_lung_model) reads.
"""

from __future__ import annotations

import argparse

from common.choices import PRECISIONS
from common.config import ConfigError, HelpFormatter, parse_list
from common.runs.command import command_line, run_command
from common.runs.safe_output import check_dir_path
from lungs.settings import LungEvaluateSettings, LungTrainSettings

# torch is imported by lungs.train once the flags are good, so that --help answers at once.

PROG = "jobs/lung_model.py"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of radiographs (any depth; .png, .jpg, ...)")
    p.add_argument("--masks", required=True, help="folder of lung masks, 0/255 or 0/1, named as their images")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a run at --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate}", required=True)
    t = sub.add_parser("train", help="train a U-Net; best.pt in --out", formatter_class=HelpFormatter)
    _common(t)
    a = t.add_argument
    a("--size", type=int, default=256, help="square input side in pixels")
    a("--base", type=int, default=16, help="channels of the first U-Net level (doubled per level)")
    a("--depth", type=int, default=4, help="U-Net downsamplings")
    a("--split", default="0.8,0.1,0.1", help="train,val,test fractions of the patients")
    a("--split-seed", type=int, default=0, help="seed of the patient-level split")
    a("--seed", type=int, default=0, help="initialization, batch order, augmentation")
    a("--epochs", type=int, default=60, help="at most this many epochs")
    a("--batch-size", type=int, default=8, help="images per step")
    a("--lr", type=float, default=1e-3, help="Adam learning rate")
    a("--lr-patience", type=int, default=3, help="epochs without a better val Dice before the learning rate halves")
    a("--patience", type=int, default=8, help="early stopping: epochs without a better val Dice; 0 = never")
    a("--max-minutes", type=float, default=None, help="stop cleanly after this much wall-clock time, keeping best.pt")
    a("--max-steps", type=int, default=None, help="stop after this many steps in the first epoch (smoke tests)")
    a("--init", default=None,
      help="start from this lung model's weights (a best.pt, or default: the shipped one) and keep its split")
    a("--flip", action="store_true", help="also mirror training images left-right (off: the heart sits left)")
    a("--films", type=float, default=0.3,
      help="share of training images given a portable film's look (lungs.hardfilms: crops, opacities, tubes, "
           "text, low resolution, contrast extremes); 0 = off")
    a("--precision", choices=PRECISIONS, default="auto",
      help="auto: bf16 autocast on CUDA or a CPU with native bf16, else fp32")
    e = sub.add_parser("evaluate", help="score a model on pairs", formatter_class=HelpFormatter)
    e.add_argument("--model", default="default", help="a train run's best.pt, or default: the model shipped in lungs/models/")
    _common(e)
    e.add_argument("--worst", type=int, default=10, help="worst images listed in metrics.json")
    e.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                   help="score only the pairs of this split of the model's own training run (as its checkpoint records)")
    return p


def settings_from(args: argparse.Namespace) -> LungTrainSettings | LungEvaluateSettings:
    """The subcommand's settings from the parsed flags, refused before any work when bad; `args` is left as parsed."""
    for key in ("size", "base", "depth", "epochs", "batch_size", "threads", "worst", "max_steps"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "evaluate":
        return LungEvaluateSettings(**flags)
    if args.size % 2 ** args.depth:
        raise ConfigError(f"--size {args.size}: must be a multiple of 2^--depth = {2 ** args.depth}")
    from common.data.splits import check_ratios  # pandas: only once the flags parsed

    split = check_ratios(parse_list(args.split, float, "split"), "--split")
    if not 0 <= args.films <= 1:
        raise ConfigError(f"--films must be a share from 0 to 1, got {args.films}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ConfigError(f"--max-minutes must be positive, got {args.max_minutes}")
    return LungTrainSettings(**{**flags, "split": split})


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    settings = settings_from(build_parser(prog).parse_args(argv))
    check_dir_path(settings.out)
    from lungs.train import run_evaluate, run_train

    command = command_line(prog, argv)
    return (run_train if isinstance(settings, LungTrainSettings) else run_evaluate)(settings, command)


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
