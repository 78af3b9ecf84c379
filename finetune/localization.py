"""Boxes drawn from class activation maps (common/models/cam.py), and their scoring against radiologists' boxes.

Boxes and their scoring follow Wang et al. 2017
(ChestX-ray8): min-max normalize the map, keep what lies above 180 of 255, box each connected
region, and call an image's localization correct when a box overlaps the radiologist's box by
more than T in IoU or in IoBB (intersection over the predicted box's area).

Pure torch/numpy; `evaluate_localization` is the glue a fine-tune job calls on a model it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn
from torchvision.ops import box_area, box_iou

from common.data.bboxes import NIH_BBOX_IMAGE_SIZE
from common.images.data_config import DataConfig
from common.models.cam import heatmap_fn, map_to_grid
from common.models.model_registry import BackboneSpec
from common.images.decode import open_image, read_gray

# Wang et al. threshold the [0, 255]-normalized map at 180.
CAM_THRESHOLD = 180 / 255
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
ALL_LABELS = "all"  # the label of the overall row in accuracy tables
# Overlays: a perceptually uniform map (equal steps of evidence look equal, no red end to read as "disease"),
# its colour scale, and box colours that viridis never takes: white truth, magenta predictions.
CAM_COLORMAP = "viridis"
TRUTH_COLOUR, PREDICTED_COLOUR = "white", "#ff00ff"
OVERLAY_SIDEBAR = 1.3  # inches right of the image for the colour scale and the key
# A predicted box over half the image overlaps nearly any truth box by IoU > 0.1 (and IoBB says little):
# such boxes are counted and noted, since their hits are not localization.
LARGE_BOX = 0.5


def box_grid(path: str, long_side: int | None) -> tuple[int, int]:
    """(width, height) of the pixel grid boxes are drawn in: the file's, its long side scaled to `long_side`."""
    with open_image(path) as img:
        width, height = img.size
    if long_side is None:
        return width, height
    k = long_side / max(width, height)
    return max(1, round(width * k)), max(1, round(height * k))


def cam_to_boxes(cam: np.ndarray, threshold: float = CAM_THRESHOLD) -> np.ndarray:
    """Boxes (M, 4) as x, y, w, h in pixels of `cam` around its regions above `threshold`.

    The map is min-max normalized to [0, 1] and pixels >= threshold are kept (Wang et al.: 180
    of 255). Regions are 8-connected; pixel (i, j) spans [j, j+1) x [i, i+1), so a box is in the
    same coordinates as NIH's. Boxes are ordered by the peak value inside, highest first. A flat
    map has no region and gives no box.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("the map has non-finite values")
    low, high = cam.min(), cam.max()
    if high <= low:
        return np.zeros((0, 4))
    regions, n = ndimage.label((cam - low) / (high - low) >= threshold, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 4))
    slices = ndimage.find_objects(regions)
    boxes = np.array([(sx.start, sy.start, sx.stop - sx.start, sy.stop - sy.start) for sy, sx in slices],
                     dtype=np.float64)
    peak = np.asarray(ndimage.maximum(cam, regions, index=np.arange(1, n + 1)))
    return boxes[np.argsort(-peak, kind="stable")]


def _xyxy(boxes) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def _per_prediction(values: torch.Tensor, pred):
    """One value per predicted box: a float for one (4,) box, an array for (M, 4)."""
    out = torch.nan_to_num(values[:, 0], nan=0.0).numpy()
    return float(out[0]) if np.ndim(pred) == 1 else out


def iou(pred, truth):
    """Intersection over union of (x, y, w, h) predicted box(es) (4,) or (M, 4) with one truth box."""
    return _per_prediction(box_iou(_xyxy(pred), _xyxy(truth)), pred)


def iobb(pred, truth):
    """Intersection over the predicted box's area (Wang et al.'s IoBB); arguments as `iou`.

    A small predicted box inside the radiologist's box scores 1 here, less in IoU.
    """
    p, t = _xyxy(pred), _xyxy(truth)
    overlap = box_iou(p, t)
    # IoU = I / (A_p + A_t - I), so I = IoU * (A_p + A_t) / (1 + IoU).
    inter = overlap * (box_area(p)[:, None] + box_area(t)[None, :]) / (1 + overlap)
    area = box_area(p)[:, None]
    return _per_prediction(torch.where(area > 0, inter / area.clamp(min=1e-12), 0.0), pred)


MEASURES = {"iou": (iou, IOU_THRESHOLDS), "iobb": (iobb, IOBB_THRESHOLDS)}


def localization_accuracy(
    pred_boxes: Mapping[tuple[str, str], np.ndarray],
    truth_boxes: pd.DataFrame,
    measure: str = "iou",
    thresholds: Sequence[float] | None = None,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Wang et al.'s accuracy: the share of ground-truth boxes that some predicted box overlaps by > T.

    pred_boxes maps (image_id, label) to an (M, 4) array of x, y, w, h (missing or empty: a miss);
    truth_boxes has image_id, label, x, y, w, h (common.data.bboxes). Returns one row per label and
    threshold, then the overall rows (label "all"): label, measure, threshold, accuracy, n; with
    `image_sizes` ({image_id: (width, height)} of the boxes' grid) also large_boxes: how many of those
    truth boxes were met by a predicted box over LARGE_BOX of the image, whose overlaps find nothing.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown overlap measure {measure!r}: choose from {', '.join(MEASURES)}")
    overlap, default = MEASURES[measure]
    thresholds = default if thresholds is None else tuple(thresholds)
    if len(truth_boxes) == 0:
        raise ValueError("no ground-truth boxes to score")
    truth = truth_boxes[["x", "y", "w", "h"]].to_numpy(np.float64)
    best = np.zeros(len(truth))
    for i, (image_id, label) in enumerate(zip(truth_boxes["image_id"], truth_boxes["label"])):
        pred = np.asarray(pred_boxes.get((image_id, label), np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        if len(pred):
            best[i] = np.max(overlap(pred, truth[i]))
    large = np.array([image_sizes is not None and large_box_share(
        pred_boxes.get((image_id, label)), *image_sizes[image_id]) > LARGE_BOX
        for image_id, label in zip(truth_boxes["image_id"], truth_boxes["label"])], dtype=bool)
    labels = truth_boxes["label"].to_numpy()
    rows = []
    for label in [*pd.unique(labels), ALL_LABELS]:
        pick = np.ones(len(labels), bool) if label == ALL_LABELS else labels == label
        for t in thresholds:
            rows.append((label, measure, float(t), float(np.mean(best[pick] > t)), int(pick.sum()),
                         int(large[pick].sum())))
    columns = ["label", "measure", "threshold", "accuracy", "n", "large_boxes"]
    return pd.DataFrame(rows, columns=columns).drop(columns=[] if image_sizes is not None else ["large_boxes"])


def large_box_share(boxes, width: int, height: int) -> float:
    """The largest share of a `width` x `height` image that one of the (x, y, w, h) boxes covers (0 without)."""
    boxes = np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4)
    return float((boxes[:, 2] * boxes[:, 3]).max() / (width * height)) if len(boxes) else 0.0


def large_box_note(share: float) -> str | None:
    """What to say of a predicted box over LARGE_BOX of the image: its overlaps score without finding anything."""
    if share <= LARGE_BOX:
        return None
    return f"a predicted box covers {share:.0%} of the image: IoU above 0.1 is then near-automatic"


def overlay_png(
    image_gray: np.ndarray,
    cam: np.ndarray,
    truth_box,
    pred_boxes,
    path: str | Path,
    title: str | None = None,
    cmap: str = CAM_COLORMAP,
) -> str | None:
    """Save the image with the map as a heat overlay on `cmap` with its colour scale, the truth box(es) solid
    white and the predicted ones dashed magenta (each with a dark outline, so both stand out on any part of
    the map); returns the note written on it when a predicted box covers most of the image (large_box_note)."""
    # The object API with no pyplot: no global backend or figure state, safe next to other plotting.
    from matplotlib import patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    image_gray, cam = np.asarray(image_gray), np.asarray(cam, dtype=np.float64)
    if image_gray.shape != cam.shape or image_gray.ndim != 2:
        raise ValueError(f"image {image_gray.shape} and map {cam.shape} must be the same 2-D shape")
    height, width = cam.shape
    span = cam.max() - cam.min()
    shown = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    # The image keeps a 6 x 6 inch square at the left; the colour scale and the key take the column beside it.
    fig_w, fig_h = 6 + OVERLAY_SIDEBAR, 6.4 if title else 6
    top = 6 / fig_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_axes((0, 0, 6 / fig_w, top))
    # extent puts pixel (i, j) on [j, j+1) x [i, i+1), the boxes' coordinates.
    extent = (0, width, height, 0)
    ax.imshow(image_gray, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    ax.imshow(shown, cmap=cmap, alpha=0.45, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    outline = [patheffects.withStroke(linewidth=4.5, foreground="black")]
    for boxes, colour, style in ((truth_box, TRUTH_COLOUR, "-"), (pred_boxes, PREDICTED_COLOUR, "--")):
        if boxes is None:
            continue
        for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2, linestyle=style,
                                   path_effects=outline))
    note = large_box_note(large_box_share(pred_boxes, width, height))
    if note:
        ax.text(0.01 * width, 0.99 * height, note, color="white", fontsize=8, va="bottom",
                bbox={"facecolor": "black", "alpha": 0.75, "edgecolor": "none"})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    left = (6 + 0.25) / fig_w
    scale_axes = fig.add_axes((left, 0.08 * top, 0.18 / fig_w, 0.55 * top))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=scale_axes)
    bar.set_label("class activation, min-max per image", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    key = [Line2D([], [], color=TRUTH_COLOUR, lw=2, path_effects=outline, label="radiologist"),
           Line2D([], [], color=PREDICTED_COLOUR, lw=2, ls="--", path_effects=outline, label="from CAM")]
    fig.legend(handles=key, loc="upper left", bbox_to_anchor=(6.02 / fig_w, 0.98 * top), fontsize=7,
               facecolor="0.35", labelcolor="white", framealpha=1, handlelength=2.2)
    if title:
        fig.suptitle(title, fontsize=10, y=0.985)
    fig.savefig(path, format="png")
    return note


def evaluate_localization(
    model: nn.Module,
    spec: BackboneSpec,
    bbox_table: pd.DataFrame,
    image_paths: Mapping[str, str],
    label_names: Sequence[str],
    data_config: DataConfig | None = None,
    device: torch.device | str | None = None,
    out_dir: str | Path | None = None,
    n_overlays: int = 8,
    threshold: float = CAM_THRESHOLD,
    batch_size: int = 8,
    box_image_size: int | None = NIH_BBOX_IMAGE_SIZE,
) -> pd.DataFrame:
    """CAM localization accuracy of `model` on the boxes whose image is in `image_paths`.

    `model` is library_model(spec) with a len(label_names)-way Linear at spec.classifier, already
    on `device` (default: where its parameters are). Each image is the model's input as
    `data_config` (default the spec's) builds it; each box's label picks the class whose map is
    carried back onto the boxes' pixel grid through that input's geometry (`map_to_grid`) and
    boxed. The grid is the image file's own, scaled so its long side is `box_image_size` (NIH's
    boxes are in 1024-px coordinates whatever size the file is; None: the file's size). Returns
    the accuracy table of both measures (localization_accuracy, with its large_boxes count). With
    `out_dir`, overlays of the first `n_overlays` (image, label) pairs are written there as
    <image stem>_<label>.png.
    The model runs in eval mode and is put back in the mode it was in.
    """
    class_maps = heatmap_fn(model, spec)
    index, truth = _boxes_to_score(model, spec, bbox_table, image_paths, label_names)
    data_config = data_config or spec.data_config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    preds: dict[tuple[str, str], np.ndarray] = {}
    sizes: dict[str, tuple[int, int]] = {}
    overlays_left = n_overlays if out_dir is not None else 0
    was_training = model.training
    model.eval()
    try:
        maps = _maps_on_box_grids(class_maps, truth, index, image_paths, data_config, device, batch_size,
                                  box_image_size)
        for image_id, label, grid, cam_map in maps:
            boxes = cam_to_boxes(cam_map, threshold)
            preds[(image_id, label)], sizes[image_id] = boxes, grid
            if overlays_left > 0:
                overlays_left -= 1
                here = truth[(truth["image_id"] == image_id) & (truth["label"] == label)]
                overlay_png(read_gray(image_paths[image_id], grid), cam_map, here[["x", "y", "w", "h"]].to_numpy(),
                            boxes, Path(out_dir) / f"{Path(image_id).stem}_{label}.png",
                            title=f"{image_id}  {label} ({spec.name})")
    finally:
        model.train(was_training)
    return pd.concat([localization_accuracy(preds, truth, m, image_sizes=sizes) for m in MEASURES], ignore_index=True)


def _boxes_to_score(model: nn.Module, spec: BackboneSpec, bbox_table: pd.DataFrame, image_paths: Mapping[str, str],
                    label_names: Sequence[str]) -> tuple[dict[str, int], pd.DataFrame]:
    """The class index of each label name and the box table's rows whose image is in `image_paths`, or a
    ValueError when the names do not fit the classifier, no box is left or a box's label is not the model's."""
    index = {name: i for i, name in enumerate(label_names)}
    outputs = model.n_labels if hasattr(model, "n_labels") else model.get_submodule(spec.classifier).out_features
    if len(index) != outputs:
        raise ValueError(f"{len(index)} label names for a {outputs}-way classifier")
    truth = bbox_table[bbox_table["image_id"].isin(list(image_paths))].reset_index(drop=True)
    if truth.empty:
        raise ValueError("none of the box table's images is in image_paths")
    unknown = sorted(set(truth["label"]) - set(index))
    if unknown:
        raise ValueError(f"box label(s) {', '.join(map(repr, unknown))} not among the model's labels")
    return index, truth


def _maps_on_box_grids(class_maps, truth: pd.DataFrame, index: Mapping[str, int], image_paths: Mapping[str, str],
                       data_config: DataConfig, device: torch.device, batch_size: int, box_image_size: int | None):
    """(image_id, label, grid, map) for each box label of each image, in batches of `batch_size` images:
    the label's class map carried onto the boxes' pixel grid (box_grid). Torch runs in inference mode, and
    nothing is yielded from inside it: the caller's code never runs in it."""
    labels_of = truth.groupby("image_id", sort=False)["label"].unique()
    images = list(labels_of.index)
    for begin in range(0, len(images), batch_size):
        batch = images[begin : begin + batch_size]
        pixels = np.stack([data_config.load(image_paths[i]) for i in batch])
        with torch.inference_mode():
            all_maps, _ = class_maps(data_config.to_tensor(pixels).to(device))
        for j, image_id in enumerate(batch):
            labels = list(labels_of[image_id])
            grid = box_grid(image_paths[image_id], box_image_size)
            with torch.inference_mode():
                maps = map_to_grid(all_maps[j, [index[l] for l in labels]], data_config, grid).cpu().numpy()
            for label, cam_map in zip(labels, maps):
                yield image_id, label, grid, cam_map
