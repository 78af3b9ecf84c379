"""Lung Dice on Shenzhen's test patients and on portable-film look-alikes made from them (lungs.hardfilms).

    .venv/bin/python bench/lungs_hardfilms.py [--model default] [--tta] [--out runs/lungs-hardfilms]

The test patients are the split the model's checkpoint records. Each hard set is the same 56-57 films
through one lungs.hardfilms transform (seeded: the same on every machine). Per set it prints mean
Dice of the raw masks and of each post-processing rule, how much the rule moved each image's Dice
(mean, worst, how many images lost more than 0.005), and saves overlays of the worst films
(green agreed, red missed lung, blue added) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungs.data import load_pairs, pair_files  # noqa: E402
from lungs.hardfilms import KINDS, hard_set  # noqa: E402
from lungs.metrics import per_image  # noqa: E402
from lungs.model import load_lung_model, predict_logits, predict_logits_tta, read_lung_checkpoint  # noqa: E402
from lungs.postprocess import postprocess  # noqa: E402
from lungs.report import overlay  # noqa: E402

SHENZHEN = REPO.parent / "shared" / "data" / "lungs" / "shenzhen"


def ledNet_rule(mask: np.ndarray) -> np.ndarray:
    """The rule this repository shipped first (LeDNet's): the two non-tiny regions nearest the center,
    holes filled, a lone one-sided lung mirrored; kept here to measure the current rule against."""
    labels, count = ndimage.label(mask)
    out = mask
    if count:
        index = np.arange(1, count + 1)
        areas = ndimage.sum(mask, labels, index)
        centers = np.asarray(ndimage.center_of_mass(mask, labels, index)).reshape(-1, 2)
        middle = (np.asarray(mask.shape) - 1) / 2
        big = [i for i in range(count) if areas[i] >= 0.05 * areas.max()]
        nearest = sorted(big, key=lambda i: np.hypot(*(centers[i] - middle)))[:2]
        out = np.isin(labels, index[nearest])
    out = ndimage.binary_fill_holes(out)
    labels, count = ndimage.label(out)
    if count == 1 and np.logical_and(out, out[:, ::-1]).sum() <= 0.1 * out.sum():
        out = out | out[:, ::-1]
    return out


RULES = {
    "ledNet (before)": ledNet_rule,
    "post (now)": lambda m: postprocess(m)[0],
    "keep only": lambda m: postprocess(m, fill=False, mirror=False)[0],
    "fill only": lambda m: postprocess(m, keep=False, mirror=False)[0],
    "mirror only": lambda m: postprocess(m, keep=False, fill=False)[0],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--images", default=str(SHENZHEN / "images"))
    p.add_argument("--masks", default=str(SHENZHEN / "masks"))
    p.add_argument("--split", default="test", help="the checkpoint's split to start from")
    p.add_argument("--kinds", default=",".join(KINDS), help="hard sets, comma-separated (lungs.hardfilms.KINDS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tta", action="store_true", help="also score test-time augmentation (lungs.model.predict_logits_tta)")
    p.add_argument("--worst", type=int, default=3, help="overlays saved per set")
    p.add_argument("--out", default=str(REPO / "runs" / "lungs-hardfilms"))
    args = p.parse_args()
    model, config = load_lung_model(args.model)
    stems = read_lung_checkpoint(args.model)["data"]["split"][args.split]
    loaded = load_pairs(pair_files(args.images, args.masks), stems, config["size"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"shenzhen": (loaded.images, loaded.masks)}
    sets.update({k: hard_set(loaded.images, loaded.masks, k, args.seed) for k in args.kinds.split(",") if k})
    predictors = {"plain": predict_logits, **({"tta": predict_logits_tta} if args.tta else {})}
    results = {}
    print(f"{args.model}: {len(loaded.stems)} {args.split} films of {args.images}")
    for name, (images, masks) in sets.items():
        for how, predict in predictors.items():
            t0 = time.monotonic()
            raw = predict(model, images) > 0
            d_raw = per_image(raw, masks)[0]
            row = {"raw": float(d_raw.mean()), "raw_min": float(d_raw.min()), "seconds": time.monotonic() - t0}
            line = [f"{name:9s} {how:5s} raw {d_raw.mean():.4f} (min {d_raw.min():.3f})"]
            for rule, fn in RULES.items():
                cleaned = np.stack([fn(m) for m in raw])
                d = per_image(cleaned, masks)[0]
                delta = d - d_raw
                row[rule] = {"dice": float(d.mean()), "min": float(d.min()), "delta_mean": float(delta.mean()),
                             "delta_worst": float(delta.min()), "lowered": int((delta < -0.005).sum())}
                line.append(f"{rule} {d.mean():.4f} (Δ {delta.mean():+.4f}, worst {delta.min():+.3f}, "
                            f"{int((delta < -0.005).sum())} lowered)")
                if rule == "post (now)" and how == "plain":
                    for k in np.argsort(d, kind="stable")[:args.worst]:
                        overlay(images[k], masks[k], cleaned[k]).save(out / f"{name}_{loaded.stems[k]}_{d[k]:.3f}.png")
            results[f"{name}/{how}"] = row
            print("  ".join(line[:1]) + "\n    " + "\n    ".join(line[1:]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'} and the worst overlays")


if __name__ == "__main__":
    main()
