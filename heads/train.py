"""Train a head on one or several feature stores and write a self-describing run directory.

    python -m heads.train --store stores/nih-resnet50 --head mlp3 --loss weighted_bce --out runs/x
    python -m heads.train --config conf/heads.toml --out runs/y --grid-lr 1e-4,3e-4,1e-3 --grid-weight-decay 0,1e-5,1e-4

Settings: built-in defaults < the [train] table of --config < flags. See docs/heads.md.
"""

from __future__ import annotations

import argparse

from common.evaluation.bootstrap import BOOTSTRAP_DRAWS, MIN_VALID_DRAWS, check_draws
from common.evaluation.age_bands import add_flag as add_age_bands_flag, parse_age_bands
from common.evaluation.operating_points import add_flag as add_operating_point_flag, parse_targets
from common.config import (ConfigError, HelpFormatter, add_adam_flags, add_loss_flags, log, parse_list,
                           parse_with_config, require)
from common.data.targets import HEAD_POLICIES
from common.runs.command import command_line, run_command
from common.choices import CALIBRATION_METHODS
from heads.choices import KINDS, PRECISIONS, SEX_ENCODINGS
from heads.settings import HeadSettings

# The run itself (heads/run.py: torch, sklearn, matplotlib) is imported once the flags are good, so
# that --help and a flag error answer at once.

PROG = "python -m heads.train"
GRID_METRICS = ("val_auc", "val_loss")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="TOML file whose [train] table sets defaults for these flags (e.g. conf/heads.toml)")
    a("--store", nargs="+", help="feature store directory; several are fused column-wise")
    a("--out", help="run directory to create")
    a("--overwrite", action="store_true", help="replace an existing run directory at --out")
    g = p.add_argument_group("data")
    g.add_argument("--labels", default="all", help="all | competition (CheXpert's five) | comma-separated names")
    g.add_argument("--keep-no-finding", action="store_true", help="also train on a 'No Finding' label (dropped by default)")
    g.add_argument("--policy", default="ignore",
                   help=f"uncertain (-1) labels: {' | '.join(HEAD_POLICIES)} (U-Ignore, U-Zeros, U-Ones, U-MultiClass, "
                        "U-SelfTrained)")
    g.add_argument("--self-train-rounds", type=int, default=5,
                   help="selftrained: at most this many relabel-and-retrain rounds after the U-Ignore fit")
    g.add_argument("--self-train-tol", type=float, default=0.01,
                   help="selftrained: stop when no relabelled target moved more than this between rounds")
    g.add_argument("--age-sex", action=argparse.BooleanOptionalAction, default=False,
                   help="append age/100 and sex to the features")
    g.add_argument("--sex-encoding", default="indicator", help=f"{' | '.join(SEX_ENCODINGS)}")
    g = p.add_argument_group("head and loss")
    g.add_argument("--head", default="mlp3", help=f"{' | '.join(KINDS)}")
    g.add_argument("--hidden", default="128,32", help="hidden layer sizes of mlp3, comma-separated")
    g.add_argument("--dropout", type=float, default=None, help="dropout after each hidden layer (mlp3-dropout: 0.5)")
    add_loss_flags(g)
    g = p.add_argument_group("optimization")
    add_adam_flags(g, lr=1e-3, batch_size=512, epochs=50)
    g.add_argument("--plateau-patience", type=int, default=1, help="ReduceLROnPlateau patience (epochs)")
    g.add_argument("--plateau-factor", type=float, default=0.2, help="ReduceLROnPlateau factor")
    g.add_argument("--early-stop-patience", type=int, default=5, help="epochs without better val loss; 0 = never stop")
    g.add_argument("--grid-lr", default=None, help="comma-separated learning rates: grid search lr x weight decay")
    g.add_argument("--grid-weight-decay", default=None, help="comma-separated weight decays for the grid")
    g.add_argument("--grid-metric", default="val_auc", help="pick the grid cell by val_auc (max) or val_loss (min)")
    g.add_argument("--grid-ensemble", type=int, default=1,
                   help="keep the best N grid cells as one head: the mean of their probabilities (1: the best cell)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS,
                   help=f"patient-level bootstrap draws for the val/test AUROC 95%% intervals (seed 0); "
                        f"0 = no intervals, else at least {MIN_VALID_DRAWS}")
    g.add_argument("--calibrate", default="none",
                   help=f"{' | '.join(CALIBRATION_METHODS)}; temperature: fit one temperature per class on val "
                        "(NLL), write calibration.json, report ECE before and after; predict and the service then "
                        "output calibrated probabilities")
    add_operating_point_flag(g)
    add_age_bands_flag(g)
    g = p.add_argument_group("machine")
    # Not --seed, which names the split seed in the jobs.
    g.add_argument("--init-seed", type=int, default=0, help="weight init, dropout and batch order")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    g.add_argument("--precision", default="auto",
                   help="auto (bf16 matmuls on a CPU with native bf16, else fp32) | fp32 | bf16")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    return p


def settings_from(args: argparse.Namespace) -> HeadSettings:
    """Validated, normalized settings: what config.json records and the run is made from."""
    s = {k: v for k, v in vars(args).items() if k != "config"}
    require(args, "store", "out")
    s["store"] = (s["store"],) if isinstance(s["store"], str) else tuple(s["store"])
    s["hidden"] = tuple(parse_list(s["hidden"], int, "hidden"))
    s["betas"] = tuple(parse_list(s["betas"], float, "betas"))
    s["grid_lr"] = tuple(parse_list(s["grid_lr"], float, "grid-lr"))
    s["grid_weight_decay"] = tuple(parse_list(s["grid_weight_decay"], float, "grid-weight-decay"))
    s["operating_point"] = parse_targets(s["operating_point"])
    checks = [("policy", HEAD_POLICIES), ("sex_encoding", SEX_ENCODINGS), ("head", KINDS), ("precision", PRECISIONS),
              ("grid_metric", GRID_METRICS), ("calibrate", CALIBRATION_METHODS)]
    for key, allowed in checks:
        if s[key] not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} {s[key]!r}: choose from {', '.join(allowed)}")
    cells = len(s["grid_lr"] or [0]) * len(s["grid_weight_decay"] or [0])
    if not 1 <= s["grid_ensemble"] <= cells:
        raise ConfigError(f"--grid-ensemble {s['grid_ensemble']}: between 1 and the grid's {cells} cell(s)")
    if s["self_train_rounds"] < 1 or not s["self_train_tol"] >= 0:
        raise ConfigError("--self-train-rounds must be at least 1 and --self-train-tol not negative")
    if len(s["betas"]) != 2:
        raise ConfigError(f"--betas {s['betas']}: give two values")
    if s["batch_size"] < 1 or s["epochs"] < 1:
        raise ConfigError("--batch-size and --epochs must be positive")
    check_draws(s["bootstrap_draws"])
    s["age_bands"] = parse_age_bands(s["age_bands"])
    return HeadSettings(**s)


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Train a head run from these flags; bad input raises (cli turns it into the one-line exit)."""
    settings = settings_from(parse_with_config(build_parser(prog), argv, "train"))

    from common.runs import rundir
    from heads.run import run

    command = command_line(prog, argv)
    return rundir.write_run(settings.out, settings.overwrite, "head", lambda out: run(settings, out, command),
                            log, inputs=settings.store)


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)

if __name__ == "__main__":
    cli()
