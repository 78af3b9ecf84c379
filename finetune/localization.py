"""Class activation maps, boxes drawn from them, and their scoring against radiologists' boxes.

CAM (Zhou et al. 2016): for a network that ends in global average pooling and one Linear layer,
the map of class k is CAM_k(i, j) = sum_c w_kc * F_c(i, j) over the last convolutional feature
maps F. Its spatial mean plus the bias b_k is exactly the logit of class k, so the map shows
where the evidence for the logit lies. Boxes and their scoring follow Wang et al. 2017
(ChestX-ray8): min-max normalize the map, keep what lies above 180 of 255, box each connected
region, and call an image's localization correct when a box overlaps the radiologist's box by
more than T in IoU or in IoBB (intersection over the predicted box's area).

Pure torch/numpy; `evaluate_localization` is the glue a fine-tune job calls on a model it holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import BackboneSpec
from common.bboxes import NIH_BBOX_IMAGE_SIZE
from common.images import load_image

# Wang et al. threshold the [0, 255]-normalized map at 180.
CAM_THRESHOLD = 180 / 255
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
ALL_LABELS = "all"  # the label of the overall row in accuracy tables


@dataclass(frozen=True)
class CamLayer:
    module: str  # dotted path of the module that outputs the last feature maps before pooling
    relu: bool  # the model's forward applies a ReLU to that output before pooling


# Each of these ends in global average pooling and one Linear (dropout in between is a no-op in eval).
CAM_LAYERS = {
    "resnet50": CamLayer("layer4", relu=False),
    # DenseNet.forward: F.relu(self.features(x)) -> adaptive_avg_pool2d -> classifier. torchvision's
    # ReLU is in place, so the hooked tensor is rectified by the time forward returns; applying it
    # again costs little and keeps the maps right should that ReLU stop being in place.
    "densenet121": CamLayer("features", relu=True),
    "inception_v3": CamLayer("Mixed_7c", relu=False),
}
_NO_CAM = {
    "vgg19": "its classifier is three Linear layers on the flattened 7x7 map, not pooling and one Linear",
    "mobilenet_v3_large": "its classifier's first Linear mixes the pooled features before the last one",
}


class CamModel:
    """A registry model whose final layer (`spec.classifier`) is a K-way Linear, seen as CAM needs it.

    Calling it runs one forward pass and returns (feature_maps (N, C, h, w), logits (N, K)). The
    hook is registered for that call only, so the wrapped model is left as it was, and a
    fine-tune job can keep training it.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        if spec.name in _NO_CAM:
            raise ValueError(
                f"CAM is not defined for {spec.name}: CAM needs a single linear layer after global pooling; "
                f"{_NO_CAM[spec.name]}"
            )
        if spec.name not in CAM_LAYERS:
            raise ValueError(f"no CAM layer known for backbone {spec.name!r}: choose from {', '.join(CAM_LAYERS)}")
        self.model = model
        self.spec = spec
        self.layer = CAM_LAYERS[spec.name]
        self._feature_module = model.get_submodule(self.layer.module)
        _linear_head(model, spec)  # fail now, not at the first batch, if the head is not one Linear

    @property
    def classifier(self) -> nn.Linear:
        # Looked up on every use: a job may swap the head after wrapping.
        return _linear_head(self.model, self.spec)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured = []
        handle = self._feature_module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.model(x)
        finally:
            handle.remove()
        # inception_v3 in training mode returns (logits, aux_logits).
        logits = out.logits if hasattr(out, "logits") else out
        features = captured[-1]
        if self.layer.relu:
            features = F.relu(features)
        if features.shape[1] != self.classifier.in_features:
            raise ValueError(
                f"{self.spec.name}: {self.layer.module} gives {features.shape[1]} channels, "
                f"the classifier takes {self.classifier.in_features}"
            )
        return features, logits


def _linear_head(model: nn.Module, spec: BackboneSpec) -> nn.Linear:
    head = model.get_submodule(spec.classifier)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{spec.name}: CAM needs a single linear layer after global pooling; "
            f"{spec.classifier} is a {type(head).__name__}"
        )
    return head


def cam_model(model: nn.Module, spec: BackboneSpec) -> CamModel:
    """Wrap `model` (spec.build_model() with a K-way Linear at spec.classifier) for CAM."""
    return CamModel(model, spec)


def class_activation_maps(
    feature_maps: torch.Tensor, classifier_weight: torch.Tensor, classes: Sequence[int] | None = None
) -> torch.Tensor:
    """(N, C, h, w) feature maps, (K, C) Linear weight -> (N, K', h, w) maps for `classes` (all if None).

    The bias is left out: it is constant over space, so it moves a map's level but not its
    shape, and min-max normalization (cam_to_boxes) removes it anyway.
    """
    if feature_maps.ndim != 4 or classifier_weight.ndim != 2 or feature_maps.shape[1] != classifier_weight.shape[1]:
        raise ValueError(
            f"expected feature maps (N, C, h, w) and weight (K, C), got {tuple(feature_maps.shape)} "
            f"and {tuple(classifier_weight.shape)}"
        )
    weight = classifier_weight if classes is None else classifier_weight[list(classes)]
    return torch.einsum("kc,nchw->nkhw", weight.to(feature_maps.dtype), feature_maps)


def upsample(cams: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two dimensions to `size` (e.g. 1024, the NIH box coordinates)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = cams.shape[:-2]
    flat = cams.reshape(-1, 1, *cams.shape[-2:]).to(torch.float32)
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


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
    mask = (cam - low) / (high - low) >= threshold
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return np.zeros((0, 4))
    comp = _label_runs(rows, starts, ends, mask.shape[0])
    n = comp.max() + 1
    x0 = np.full(n, mask.shape[1]); x1 = np.zeros(n, int)
    y0 = np.full(n, mask.shape[0]); y1 = np.zeros(n, int)
    np.minimum.at(x0, comp, starts); np.maximum.at(x1, comp, ends)
    np.minimum.at(y0, comp, rows); np.maximum.at(y1, comp, rows + 1)
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, comp, _run_max(cam, rows, starts, ends))
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.float64)
    return boxes[np.argsort(-peak, kind="stable")]


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: row, first column, one past the last column; in row-major order.

    Labelling runs instead of pixels keeps the Python-level work to the few runs per row a
    smooth upsampled map has, so a 1024 x 1024 map takes milliseconds without scipy.
    """
    edges = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major order pairs each start with its own end
    return rows, starts, ends


def _label_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, height: int) -> np.ndarray:
    """Component index (0..n-1) of each run: union-find over runs touching in consecutive rows."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(height + 1))
    for r in range(1, height):
        a0, a1, b0, b1 = first[r], first[r + 1], first[r - 1], first[r]
        if a0 == a1 or b0 == b1:
            continue
        # 8-connectivity: [sa, ea) and [sb, eb) touch when they overlap or meet at a corner.
        touch = (starts[a0:a1, None] <= ends[None, b0:b1]) & (starts[None, b0:b1] <= ends[a0:a1, None])
        for i, j in zip(*np.nonzero(touch)):
            ra, rb = find(a0 + int(i)), find(b0 + int(j))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(len(rows))])
    return np.unique(roots, return_inverse=True)[1].reshape(-1)


def _run_max(cam: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    width = cam.shape[1]
    # reduceat over [start, end) pairs of the flat map; the appended element keeps the last end in range.
    flat = np.append(cam.ravel(), 0.0)
    bounds = np.empty(2 * len(rows), dtype=np.int64)
    bounds[0::2] = rows * width + starts
    bounds[1::2] = rows * width + ends
    return np.maximum.reduceat(flat, bounds)[0::2]


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def _ratio(num: np.ndarray, den: np.ndarray):
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return out[()]  # a float for single boxes, an array for arrays of boxes


def iou(box_a, box_b):
    """Intersection over union of (x, y, w, h) boxes; arrays (..., 4) broadcast against each other."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    inter = _intersection(a, b)
    return _ratio(inter, a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


def iobb(pred, truth):
    """Intersection over the predicted box's area (Wang et al.'s IoBB); broadcasts like `iou`.

    A small predicted box inside the radiologist's box scores 1 here, less in IoU.
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return _ratio(_intersection(p, t), p[..., 2] * p[..., 3])


MEASURES = {"iou": (iou, IOU_THRESHOLDS), "iobb": (iobb, IOBB_THRESHOLDS)}


def localization_accuracy(
    pred_boxes: Mapping[tuple[str, str], np.ndarray],
    truth_boxes: pd.DataFrame,
    measure: str = "iou",
    thresholds: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Wang et al.'s accuracy: the share of ground-truth boxes that some predicted box overlaps by > T.

    pred_boxes maps (image_id, label) to an (M, 4) array of x, y, w, h (missing or empty: a miss);
    truth_boxes has image_id, label, x, y, w, h (common.bboxes). Returns one row per label and
    threshold, then the overall rows (label "all"): label, measure, threshold, accuracy, n.
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
    labels = truth_boxes["label"].to_numpy()
    rows = []
    for label in [*pd.unique(labels), ALL_LABELS]:
        pick = np.ones(len(labels), bool) if label == ALL_LABELS else labels == label
        for t in thresholds:
            rows.append((label, measure, float(t), float(np.mean(best[pick] > t)), int(pick.sum())))
    return pd.DataFrame(rows, columns=["label", "measure", "threshold", "accuracy", "n"])


def overlay_png(
    image_gray: np.ndarray,
    cam: np.ndarray,
    truth_box,
    pred_boxes,
    path: str | Path,
    title: str | None = None,
) -> None:
    """Save the image with the map as a heat overlay, truth box(es) in green, predicted in red."""
    # The object API with no pyplot: no global backend or figure state, safe next to other plotting.
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    image_gray, cam = np.asarray(image_gray), np.asarray(cam, dtype=np.float64)
    if image_gray.shape != cam.shape or image_gray.ndim != 2:
        raise ValueError(f"image {image_gray.shape} and map {cam.shape} must be the same 2-D shape")
    height, width = cam.shape
    span = cam.max() - cam.min()
    shown = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    fig = Figure(figsize=(6, 6.4 if title else 6), dpi=100)
    ax = fig.add_axes((0, 0, 1, 6 / 6.4 if title else 1))
    # extent puts pixel (i, j) on [j, j+1) x [i, i+1), the boxes' coordinates.
    extent = (0, width, height, 0)
    ax.imshow(image_gray, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    ax.imshow(shown, cmap="jet", alpha=0.35, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    for boxes, colour in ((truth_box, "lime"), (pred_boxes, "red")):
        if boxes is None:
            continue
        for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, y=0.985)
    fig.savefig(path, format="png")


def evaluate_localization(
    model: nn.Module,
    spec: BackboneSpec,
    bbox_table: pd.DataFrame,
    image_paths: Mapping[str, str],
    label_names: Sequence[str],
    input_size: int | None = None,
    device: torch.device | str | None = None,
    out_dir: str | Path | None = None,
    n_overlays: int = 8,
    threshold: float = CAM_THRESHOLD,
    batch_size: int = 8,
    box_image_size: int = NIH_BBOX_IMAGE_SIZE,
) -> pd.DataFrame:
    """CAM localization accuracy of `model` on the boxes whose image is in `image_paths`.

    `model` is spec.build_model() with a len(label_names)-way Linear at spec.classifier, already
    on `device` (default: where its parameters are). Each image is loaded at `input_size`
    (default spec.input_size) and preprocessed as the spec says; each box's label picks the
    class whose map is upsampled to `box_image_size` (the boxes' pixel grid) and boxed. Returns
    the accuracy table of both measures (localization_accuracy). With `out_dir`, overlays of
    the first `n_overlays` (image, label) pairs are written there as <image stem>_<label>.png.
    The model runs in eval mode and is put back in the mode it was in.
    """
    cam = CamModel(model, spec)
    index = {name: i for i, name in enumerate(label_names)}
    if len(index) != cam.classifier.out_features:
        raise ValueError(f"{len(index)} label names for a {cam.classifier.out_features}-way classifier")
    truth = bbox_table[bbox_table["image_id"].isin(list(image_paths))].reset_index(drop=True)
    if truth.empty:
        raise ValueError("none of the box table's images is in image_paths")
    unknown = sorted(set(truth["label"]) - set(index))
    if unknown:
        raise ValueError(f"box label(s) {', '.join(map(repr, unknown))} not among the model's labels")
    prep = dataclasses.replace(spec.preprocessing, input_size=input_size or spec.input_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)

    labels_of = truth.groupby("image_id", sort=False)["label"].unique()
    images = list(labels_of.index)
    preds: dict[tuple[str, str], np.ndarray] = {}
    overlays_left = n_overlays if out_dir is not None else 0
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(images), batch_size):
            batch = images[begin : begin + batch_size]
            pixels = np.stack([load_image(image_paths[i], prep.input_size) for i in batch])
            with torch.inference_mode():
                features, _ = cam(prep.to_tensor(pixels).to(device))
                weight = cam.classifier.weight
                for j, image_id in enumerate(batch):
                    labels = list(labels_of[image_id])
                    maps = class_activation_maps(features[j : j + 1], weight, [index[l] for l in labels])
                    maps = upsample(maps, box_image_size)[0].cpu().numpy()
                    for label, cam_map in zip(labels, maps):
                        boxes = cam_to_boxes(cam_map, threshold)
                        preds[(image_id, label)] = boxes
                        if overlays_left > 0:
                            overlays_left -= 1
                            here = truth[(truth["image_id"] == image_id) & (truth["label"] == label)]
                            overlay_png(
                                load_image(image_paths[image_id], box_image_size),
                                cam_map,
                                here[["x", "y", "w", "h"]].to_numpy(),
                                boxes,
                                Path(out_dir) / f"{Path(image_id).stem}_{label}.png",
                                title=f"{image_id}  {label} ({spec.name})",
                            )
    finally:
        model.train(was_training)
    return pd.concat([localization_accuracy(preds, truth, m) for m in MEASURES], ignore_index=True)
