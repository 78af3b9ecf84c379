"""Score a lung model on loaded pairs: per-image Dice/IoU before and after post-processing, means, worst cases."""

from __future__ import annotations

import numpy as np

from lungs.metrics import per_image, summary
from lungs.model import predict_masks
from lungs.postprocess import postprocess_all


def score(model, loaded, worst: int = 5) -> tuple[dict, dict]:
    """(summary for metrics.json, arrays for the report: raw and cleaned masks, per-image Dice after)."""
    raw = predict_masks(model, loaded.images)
    clean, fired = postprocess_all(raw)
    d_raw, i_raw = per_image(raw, loaded.masks)
    d_post, i_post = per_image(clean, loaded.masks)
    order = np.argsort(d_post, kind="stable")
    rows = [{"stem": s, "dice": d_raw[k], "iou": i_raw[k], "dice_post": d_post[k], "iou_post": i_post[k]}
            for k, s in enumerate(loaded.stems)]
    result = {"raw": summary(d_raw, i_raw), "post": summary(d_post, i_post), "postprocess_fired": fired,
              "worst": [rows[k] for k in order[:worst]], "per_image": rows, "skipped": loaded.skipped}
    return result, {"raw": raw, "post": clean, "dice_post": d_post, "order": order}


def mean_dice(model, loaded) -> float:
    """Mean raw Dice: the early-stopping score."""
    if not loaded.stems:
        return float("nan")
    return float(np.mean(per_image(predict_masks(model, loaded.images), loaded.masks)[0]))
