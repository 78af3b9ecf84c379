"""Lung segmentation throughput on real NIH radiographs, measured side by side with a backbone.

    .venv/bin/python bench/lungs_throughput.py [--backbone densenet121] [--n 64] [--device cpu|cuda]

Prints, from one run on the same images: (a) the shipped lung model's images/s alone (mask
prediction + post-processing), (b) the backbone's images/s alone at its own input, and the ratio
a/b: what masking adds to an extraction's model time (decoding excluded); then (c) plain and
(d) masked extraction images/s, each the whole work of an extraction task (decode, [mask,]
embed: common.features.extraction.extract_frame, as the Spark job runs it per batch), and d/c: the
mask model's cost as a ratio. Random backbone weights: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.models.model_registry import get_spec  # noqa: E402
from common.images.data_config import DataConfig  # noqa: E402
from common.features.extraction import extract_frame  # noqa: E402
from common.models.inference import FeatureExtractor  # noqa: E402
from lungs.masking import LungMasker  # noqa: E402
from lungs.model import load_lung_model, predict_masks  # noqa: E402
from lungs.postprocess import postprocess_all  # noqa: E402


def rate(fn, batch, repeats: int) -> float:
    fn(batch[:2])  # warm-up: allocator, oneDNN kernel choice
    start = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "nih" / "images"))
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--n", type=int, default=32, help="images per batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    paths = sorted(Path(args.images).glob("*.png"))[: args.n]
    if not paths:
        sys.exit(f"no PNGs under {args.images}")
    model, config = load_lung_model("default", args.device)
    lung_in = np.stack([DataConfig(config["size"], resize="stretch").load(str(p)) for p in paths])
    extractor = FeatureExtractor(args.backbone, None, 0, device=args.device)
    spec = get_spec(args.backbone)
    backbone_in = np.stack([spec.data_config.load(str(p)) for p in paths])
    a = rate(lambda x: postprocess_all(predict_masks(model, x)), lung_in, args.repeats)
    b = rate(extractor, backbone_in, args.repeats)
    print(f"(a) lung model {config['size']} px + post-processing: {a:.1f} images/s")
    print(f"(b) {args.backbone} at {spec.input_size} px ({extractor.precision}): {b:.1f} images/s")
    print(f"a/b = {a / b:.2f}: masked extraction's model time is about {1 + b / a:.2f}x plain extraction's")
    rows = pd.DataFrame({"image_id": [p.name for p in paths], "patient_id": "p", "view": "PA", "age": 50.0,
                         "sex": 0, "labels": [[0]] * len(paths), "split": "test", "path": [str(p) for p in paths]})
    masker = LungMasker("default", args.device)
    c = rate(lambda r: extract_frame(r, extractor), rows, args.repeats)
    d = rate(lambda r: extract_frame(r, extractor, transform=masker), rows, args.repeats)
    print(f"(c) plain extraction (decode + embed): {c:.1f} images/s")
    print(f"(d) masked extraction (decode + mask + embed): {d:.1f} images/s")
    print(f"d/c = {d / c:.2f}: a masked store takes about {c / d:.2f}x the time of a plain one")


if __name__ == "__main__":
    main()
