"""Make a lung training run the shipped default: lungs/models/default.pt and default.json beside it.

    python -m lungs.ship --run runs/lungs-shenzhen

default.json says where the model came from and what it measured (from the run's own files), so
the numbers in README.md can be checked against it.
"""

from __future__ import annotations

import argparse
import shutil

from common.config import HelpFormatter

LICENCE = ("images: NLM Shenzhen set (public); masks: Stirenko et al., CC BY-NC-SA 4.0 (non-commercial, share "
           "alike): the model is trained on them, use it for research")

SHENZHEN = ("Shenzhen chest X-ray set (NLM / Shenzhen No.3 People's Hospital), 566 image/mask pairs at 256 px, "
            "../shared/data/lungs/shenzhen (see its README.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lungs.ship", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="a finished `jobs/lung_model.py train` run directory")
    p.add_argument("--source", default=SHENZHEN, help="what the training pairs were, in words")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from common.runs.rundir import BEST, CONFIG, METRICS, read_json, write_json
    from lungs.model import DEFAULT, read_lung_checkpoint

    run = Path(args.run)
    metrics, config = read_json(run / METRICS), read_json(run / CONFIG)
    ckpt = read_lung_checkpoint(run / BEST)
    DEFAULT.parent.mkdir(exist_ok=True)
    shutil.copyfile(run / BEST, DEFAULT)
    splits = metrics["splits"]
    write_json(DEFAULT.with_suffix(".json"), {
        "model": ckpt["config"], "command": config["command"], "source": args.source, "data": config["data"],
        "licence": LICENCE,
        "split_counts": {s: splits[s]["raw"]["n"] for s in splits},
        "split_seed": config["data"]["split_seed"], "train_seed": config["settings"]["seed"],
        "device": config["device"], "precision": config["precision"], "torch": config["torch"],
        "stopped": metrics["stopped"], "minutes": metrics["minutes"],
        "epochs": len(metrics["history"]), "best_val_dice": metrics["best_val_dice"],
        "metrics": {s: {"raw": splits[s]["raw"], "post": splits[s]["post"],
                        "postprocess_fired": splits[s]["postprocess_fired"]} for s in splits},
        "test_worst": splits["test"]["worst"]})
    print(f"shipped {run / BEST} as {DEFAULT}: test Dice {splits['test']['post']['dice']:.4f}, "
          f"IoU {splits['test']['post']['iou']:.4f} (after post-processing)")


if __name__ == "__main__":
    main()
