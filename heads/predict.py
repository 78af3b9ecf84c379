"""Per-image probabilities from a trained head, for the images of feature stores, a folder or one file.

    python -m heads.predict --run runs/x --store stores/nih-resnet50 --split test --out preds.parquet
    python -m heads.predict --run runs/x --images scans/ --out preds.csv
    python -m heads.predict --run runs/x --images scan.png --out -      # CSV on stdout

Output: image_id (+ split, or path and error for images), then one probability column per
label of the head: calibrated when the run has a calibration.json (temperatures fitted on its val
split; the run's own predictions files keep the raw probabilities). From a folder, each image goes
through the backbone(s) the head's stores were extracted with (backbone, weights and data config from
their manifests); an unreadable image, and a name with an image suffix that is not a regular file (a
FIFO, a dangling link: never opened), gets a row with its error and empty probabilities, never
silently dropped; files without an image suffix are counted in one log line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, HelpFormatter, log, parse_with_config, require, settings_of
from common.images.decode import MAX_PIXELS  # numpy and PIL only, as jobs/extract.py's parser
from common.runs.command import run_command
from heads.choices import PRECISIONS

# torch, pyarrow and pandas come with heads/predictions.py, imported once the flags are good, so
# that --help and a flag error answer at once.

PROG = "python -m heads.predict"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file whose [predict] table sets defaults for these flags")
    p.add_argument("--run", help="run directory (or its head.pt) written by heads.train")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--store", nargs="+", help="feature store(s), fused as at training (default: the head's own)")
    src.add_argument("--images", help="an image file, or a folder of them, to run through the head's backbone(s)")
    p.add_argument("--split", nargs="+", help="store splits to predict (default: all)")
    p.add_argument("--out", help="output file, .parquet or .csv; - writes CSV to stdout")
    p.add_argument("--precision", default="auto", help=f"{' | '.join(PRECISIONS)} (images on CUDA: fp16 too)")
    p.add_argument("--device", default="cpu", help="for --images: cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=32, help="for --images: images per backbone batch")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="for --images: an image with more pixels (from its header) gets an error row, undecoded; "
                        "guards memory against decompression bombs and huge files")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p


@dataclass(frozen=True)
class PredictSettings:
    """One field per flag (--config aside); the defaults live in the parser."""

    run: str
    store: tuple[str, ...] | None
    images: str | None
    split: tuple[str, ...] | None
    out: str
    precision: str
    device: str
    batch_size: int
    max_pixels: int
    threads: int | None


def settings_from(args: argparse.Namespace) -> PredictSettings:
    require(args, "run", "out")
    if args.out != "-" and Path(args.out).suffix not in (".parquet", ".csv"):
        raise ConfigError(f"--out {args.out}: name a .parquet or .csv file, or - for CSV on stdout")
    if args.max_pixels < 1:
        raise ConfigError(f"--max-pixels {args.max_pixels}: must be at least 1")
    for flag in ("store", "split"):  # a config file may give one value for a list flag
        if isinstance(getattr(args, flag), str):
            setattr(args, flag, [getattr(args, flag)])
    return settings_of(PredictSettings, args)


def main(argv: list[str] | None = None, prog: str = PROG) -> Path | None:
    """Write a head's probabilities from these flags; bad input raises (cli turns it into the one-line exit)."""
    args = settings_from(parse_with_config(build_parser(prog), argv, "predict"))

    import torch

    from common.runs import rundir
    from heads.checkpoint import load_head
    from heads.fit import resolve_precision
    from heads.predictions import predict_images, predict_stores, run_temperature

    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        head = load_head(args.run)
        temperature = run_temperature(args.run, head.label_names)
        if temperature is not None:
            log(f"probabilities calibrated (temperature, fitted on val) by the run's {rundir.CALIBRATION}")
        if args.images:
            frame = predict_images(head, args.images, args.device, args.precision, args.batch_size, args.threads,
                                   log=log, max_pixels=args.max_pixels, temperature=temperature)
        else:
            frame = predict_stores(head, args.store, args.split, resolve_precision(args.precision), temperature)
        out = None if args.out == "-" else rundir.write_table(frame, args.out)
    finally:
        torch.set_num_threads(threads)  # FeatureExtractor(threads=...) sets it process-wide too
    if out is None:
        frame.to_csv(sys.stdout, index=False)
    log(f"{len(frame)} rows -> {out or 'stdout'}")
    return out


def cli(argv: list[str] | None = None, prog: str = PROG) -> Path | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
