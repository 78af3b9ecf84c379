"""CAM, boxes from maps, overlap measures and Wang et al.'s accuracy, checked by hand and end to end."""

import copy
import functools
from collections import deque

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from common.models.backbones import library_model
from common.models.model_registry import get_spec
from common.data.bboxes import read_nih_bboxes
from common.images.data_config import DataConfig
from common.models.cam import CamModel, cam_model, class_activation_maps, map_to_grid
from finetune.localization import (
    ALL_LABELS,
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    cam_to_boxes,
    evaluate_localization,
    iobb,
    iou,
    large_box_note,
    large_box_share,
    localization_accuracy,
    overlay_png,
)
from tests.data_paths import NIH, NIH_IMAGES

BBOX_CSV = NIH / "BBox_List_2017.csv"
LABELS3 = ("Cardiomegaly", "Mass", "Nodule")


# The inputs are tiny: one thread is as fast and stays fast while other processes hold the cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def _k_way(name: str, k: int = 3, seed: int = 0) -> nn.Module:
    """The registry model with a K-way Linear head, random weights; callers copy it before changing it."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = library_model(spec, random_init=True)
    parent, _, attr = spec.classifier.rpartition(".")
    old = model.get_submodule(spec.classifier)
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Linear(old.in_features, k))
    return model.eval()


# --- CAM -------------------------------------------------------------------------------------------


def test_cam_is_the_weighted_sum_of_feature_maps_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])  # (1, 2, 2, 2)
    w = torch.tensor([[1.0, 10.0], [-2.0, 0.5]])  # (K=2, C=2)
    cams = class_activation_maps(f, w)
    assert cams.shape == (1, 2, 2, 2)
    assert torch.equal(cams[0, 0], torch.tensor([[1.0, 12.0], [3.0, -6.0]]))
    assert torch.equal(cams[0, 1], torch.tensor([[-2.0, -3.5], [-6.0, -8.5]]))
    only = class_activation_maps(f, w, classes=[1])
    assert only.shape == (1, 1, 2, 2) and torch.equal(only[0, 0], cams[0, 1])
    with pytest.raises(ValueError, match="expected feature maps"):
        class_activation_maps(f, torch.ones(2, 3))


@pytest.mark.parametrize(
    "name, size, channels, grid",
    [("resnet50", 64, 2048, 2), ("densenet121", 64, 1024, 2), ("inception_v3", 139, 2048, 3)],
)
def test_cam_mean_plus_bias_is_the_logit(name, size, channels, grid):
    # For global average pooling then one Linear, mean_ij CAM_k + b_k == logit_k exactly; float64
    # makes the check tight. It fails if the hook sits on the wrong module or misses DenseNet's ReLU.
    model = copy.deepcopy(_k_way(name)).double()
    cam = cam_model(model, get_spec(name))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        features, logits = cam(x)
        reference = model(x)
    assert features.shape == (2, channels, grid, grid) and logits.shape == (2, 3)
    assert torch.equal(logits, reference)
    assert not cam._feature_module._forward_hooks  # the hook lived for that call only
    with torch.no_grad():
        cams = class_activation_maps(features, cam.classifier.weight)
        rebuilt = cams.mean(dim=(2, 3)) + cam.classifier.bias
        scale = (logits - cam.classifier.bias).abs().max()
    assert scale > 1e-3  # the maps carry the logits, not just the bias
    assert torch.allclose(rebuilt, logits, rtol=1e-9, atol=1e-9 * float(scale))


def test_densenet_maps_are_after_its_relu():
    # Holds with torchvision's in-place ReLU alone; it guards the contract, not our extra ReLU.
    cam = cam_model(_k_way("densenet121"), get_spec("densenet121"))
    with torch.no_grad():
        features, _ = cam(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    assert features.min() >= 0 and (features > 0).any()


@pytest.mark.parametrize("name", ["vgg19", "mobilenet_v3_large"])
def test_backbones_without_pooling_then_one_linear_are_refused(name):
    # Refused from the spec alone, before the model is looked at.
    with pytest.raises(ValueError, match=f"{name}: CAM needs a single linear layer after global pooling"):
        CamModel(nn.Module(), get_spec(name))


def test_a_head_that_is_not_one_linear_is_refused():
    model = nn.Module()
    model.layer4 = nn.Identity()
    model.fc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="resnet50: CAM needs a single linear layer.*fc is a Sequential"):
        cam_model(model, get_spec("resnet50"))


def test_map_on_a_square_grid_is_the_bilinear_upsampling():
    # NIH: a square image, so the map goes to the 1024 grid exactly as a bilinear resize would take it.
    cams = torch.randn(3, 7, 7)
    got = map_to_grid(cams, DataConfig(224), (1024, 1024))
    want = torch.nn.functional.interpolate(cams[None], size=(1024, 1024), mode="bilinear", align_corners=False)[0]
    assert got.shape == (3, 1024, 1024)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("resize", ["pad", "crop", "stretch"])
def test_map_peak_lands_where_the_input_showed_it(resize):
    # A map peaking at one input pixel must peak at that pixel's original position in a wide image.
    cfg = DataConfig(40, resize=resize)
    width, height = 200, 100
    place = cfg.placement(width, height)
    x0, y0 = 130.0, 60.0  # a point of the original image
    xi, yi = place.to_input(np.array(x0), np.array(y0))
    cams = torch.zeros(1, 40, 40)
    cams[0, int(yi), int(xi)] = 1.0
    out = map_to_grid(cams, cfg, (width, height))[0]
    y, x = np.unravel_index(int(out.argmax()), out.shape)
    assert abs(x + 0.5 - x0) <= 1 / place.scale_x + 1 and abs(y + 0.5 - y0) <= 1 / place.scale_y + 1
    if resize == "crop":  # the cut sides show nothing: they get the map's minimum
        assert float(out[:, :10].max()) == 0.0


# --- boxes from maps -------------------------------------------------------------------------------


def test_one_blob_gives_its_box():
    cam = np.zeros((40, 50))
    cam[10:20, 5:30] = 1.0  # rows 10..19, columns 5..29
    assert cam_to_boxes(cam).tolist() == [[5.0, 10.0, 25.0, 10.0]]


def test_two_blobs_give_two_boxes_highest_peak_first():
    cam = np.zeros((32, 32))
    cam[2:6, 2:8] = 0.8
    cam[20:30, 15:18] = 1.0
    cam[25, 16] = 3.0  # peak of the second blob
    cam[3, 3] = 2.0
    boxes = cam_to_boxes(cam, threshold=0.2)
    assert boxes.tolist() == [[15.0, 20.0, 3.0, 10.0], [2.0, 2.0, 6.0, 4.0]]


def test_regions_are_eight_connected_and_merge_across_branches():
    cam = np.zeros((10, 10))
    cam[1, 1] = cam[2, 2] = 1.0  # diagonal neighbours: one region
    u = np.zeros((10, 10))
    u[1:8, 1] = u[1:8, 6] = u[7, 1:7] = 1.0  # a U: two arms that meet only at the bottom
    assert cam_to_boxes(cam).tolist() == [[1.0, 1.0, 2.0, 2.0]]
    assert cam_to_boxes(u).tolist() == [[1.0, 1.0, 6.0, 7.0]]


def test_threshold_is_on_the_min_max_normalized_map_and_flat_maps_have_no_box():
    cam = np.array([[10.0, 14.0, 17.0, 20.0]])  # normalized: 0, 0.4, 0.7, 1
    assert cam_to_boxes(cam, threshold=0.7).tolist() == [[2.0, 0.0, 2.0, 1.0]]
    assert cam_to_boxes(cam, threshold=0.71).tolist() == [[3.0, 0.0, 1.0, 1.0]]
    assert cam_to_boxes(np.full((8, 8), 3.0)).shape == (0, 4)
    with pytest.raises(ValueError, match="non-finite"):
        cam_to_boxes(np.array([[0.0, np.nan]]))


def _bfs_boxes(mask: np.ndarray) -> set:
    seen = np.zeros_like(mask)
    boxes = set()
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, cells = deque([start]), []
        while queue:
            r, c = queue.popleft()
            cells.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    n = (r + dr, c + dc)
                    if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not seen[n]:
                        seen[n] = True
                        queue.append(n)
        rs, cs = np.array(cells).T
        boxes.add((cs.min(), rs.min(), cs.max() - cs.min() + 1, rs.max() - rs.min() + 1))
    return boxes


@pytest.mark.parametrize("seed", range(4))
def test_components_match_a_breadth_first_search_on_noise(seed):
    cam = np.random.default_rng(seed).random((37, 41))
    boxes = cam_to_boxes(cam, threshold=0.6)
    expected = _bfs_boxes((cam - cam.min()) / (cam.max() - cam.min()) >= 0.6)
    assert len(expected) > 10
    assert set(map(tuple, boxes.astype(int).tolist())) == expected and len(boxes) == len(expected)


# --- overlap and accuracy --------------------------------------------------------------------------


def test_iou_and_iobb_by_hand():
    a = (0, 0, 2, 2)
    assert iou(a, a) == 1.0 and iobb(a, a) == 1.0
    assert iou(a, (5, 5, 1, 1)) == 0.0 and iobb(a, (5, 5, 1, 1)) == 0.0
    assert iou(a, (2, 0, 2, 2)) == 0.0  # sharing an edge is no overlap
    half = (1, 0, 2, 2)  # intersection 2, union 6, predicted area 4
    assert iou(a, half) == pytest.approx(1 / 3) and iobb(a, half) == 0.5
    inside, truth = (1, 1, 2, 2), (0, 0, 4, 4)  # prediction within the truth: IoBB 1, IoU 4/16
    assert iobb(inside, truth) == 1.0 and iou(inside, truth) == 0.25
    assert iobb(truth, inside) == 0.25  # IoBB divides by the predicted box, so it is not symmetric
    assert iobb((1, 1, 0, 3), truth) == 0.0  # an empty prediction scores nothing
    many = iou(np.array([a, half, (5, 5, 1, 1)]), a)
    assert many.shape == (3,) and many.tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_localization_accuracy_by_hand():
    truth = pd.DataFrame(
        {
            "image_id": ["i1", "i2", "i3", "i3"],
            "label": ["Mass", "Mass", "Mass", "Nodule"],
            "x": [0.0, 0.0, 0.0, 10.0], "y": [0.0, 0.0, 0.0, 10.0],
            "w": [4.0, 4.0, 4.0, 2.0], "h": [4.0, 4.0, 4.0, 2.0],
        }
    )
    preds = {
        ("i1", "Mass"): np.array([[20, 20, 1, 1], [0, 0, 4, 4]]),  # second box exact: IoU 1
        ("i2", "Mass"): np.array([[0, 0, 2, 4]]),  # IoU 0.5 exactly, IoBB 1
        ("i3", "Mass"): np.zeros((0, 4)),  # no box: a miss
        # ("i3", "Nodule") absent: a miss
    }
    table = localization_accuracy(preds, truth, "iou", thresholds=[0.3, 0.5])
    assert list(table.columns) == ["label", "measure", "threshold", "accuracy", "n"]
    got = {(r.label, r.threshold): (r.accuracy, r.n) for r in table.itertuples()}
    # Correct means overlap > T: i2's IoU of exactly 0.5 fails at T = 0.5.
    assert got == {
        ("Mass", 0.3): (2 / 3, 3), ("Mass", 0.5): (1 / 3, 3),
        ("Nodule", 0.3): (0.0, 1), ("Nodule", 0.5): (0.0, 1),
        (ALL_LABELS, 0.3): (0.5, 4), (ALL_LABELS, 0.5): (0.25, 4),
    }
    by_iobb = localization_accuracy(preds, truth, "iobb")
    assert tuple(by_iobb["threshold"].unique()) == IOBB_THRESHOLDS and (by_iobb["measure"] == "iobb").all()
    assert by_iobb.query("label == 'Mass' and threshold == 0.9")["accuracy"].item() == pytest.approx(2 / 3)
    assert tuple(localization_accuracy(preds, truth)["threshold"].unique()) == IOU_THRESHOLDS
    with pytest.raises(ValueError, match="unknown overlap measure"):
        localization_accuracy(preds, truth, "dice")


# --- overlay and end to end ------------------------------------------------------------------------


def _overlay_pixels(tmp_path, pred, name="overlay.png"):
    size = 256
    yy, xx = np.mgrid[0:size, 0:size]
    image = (0.3 + 0.4 * xx / size).astype(np.float32)
    cam = np.exp(-((xx - 64) ** 2 + (yy - 160) ** 2) / 800.0)
    note = overlay_png(image, cam, (32, 128, 64, 64), pred, tmp_path / name)
    return np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int), 600 / size, note


def test_overlay_draws_truth_white_and_predictions_magenta_where_they_are(tmp_path):
    truth, pred = (32, 128, 64, 64), np.array([[150, 20, 80, 40]])
    pixels, scale, note = _overlay_pixels(tmp_path, pred)
    assert pixels.shape[0] == 600 and pixels.shape[1] > 600 and note is None  # the colour scale beside the image
    image = pixels[:, :600]  # the key's white text and the scale lie right of the image
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    white, magenta = (r > 235) & (g > 235) & (b > 235), (r > 200) & (g < 80) & (b > 200)
    for mask, (x, y, w, h) in ((white, truth), (magenta, pred[0])):
        rows, cols = np.nonzero(mask)
        assert len(rows) > 100
        assert abs(cols.min() - x * scale) <= 3 and abs(cols.max() - (x + w) * scale) <= 3
        assert abs(rows.min() - y * scale) <= 3 and abs(rows.max() - (y + h) * scale) <= 3
    # Each box has a dark outline: black pixels hug the white one.
    assert ((r < 40) & (g < 40) & (b < 40))[int(127 * scale) - 4:int(129 * scale) + 4, int(40 * scale)].any()
    with pytest.raises(ValueError, match="same 2-D shape"):
        overlay_png(np.zeros((10, 10)), np.zeros((10, 12)), truth, pred, tmp_path / "x.png")


def test_overlay_map_is_viridis_with_a_colour_scale(tmp_path):
    pixels, scale, _ = _overlay_pixels(tmp_path, None)
    peak = pixels[int(160 * scale), int(64 * scale)]
    low = pixels[int(20 * scale), int(20 * scale)]
    # viridis's top is yellow (jet's a dark red): green as high as red at the peak; its bottom a purple.
    assert peak[1] > 130 and abs(peak[0] - peak[1]) < 40 and peak[2] < peak[1] - 40, peak
    assert low[2] > low[1] and low[0] > low[1], low
    beside = pixels[:, 600:]  # the colour scale: the map's own colours, unblended, from its bottom to its top
    for v in (0.01, 0.5, 0.99):
        colour = np.round(255 * np.array(colormaps["viridis"](v)[:3])).astype(int)
        assert (np.abs(beside - colour).sum(axis=-1) < 30).any(), v


def test_a_box_over_half_the_image_is_noted_and_counted(tmp_path):
    _, _, note = _overlay_pixels(tmp_path, np.array([[5, 5, 240, 240]]))
    assert note and "88% of the image" in note and "IoU above 0.1 is then near-automatic" in note
    assert large_box_share(np.array([[0, 0, 10, 10], [0, 0, 50, 40]]), 100, 40) == 0.5
    assert large_box_note(0.5) is None and large_box_share(None, 10, 10) == 0.0
    truth = pd.DataFrame({"image_id": ["a", "b"], "label": ["Mass", "Mass"], "x": 10.0, "y": 10.0, "w": 5.0,
                          "h": 5.0})
    preds = {("a", "Mass"): np.array([[0, 0, 100, 90]]), ("b", "Mass"): np.array([[9, 9, 7, 7]])}
    table = localization_accuracy(preds, truth, "iou", [0.001], image_sizes={"a": (100, 100), "b": (100, 100)})
    assert table.set_index("label")["large_boxes"].to_dict() == {"Mass": 1, ALL_LABELS: 1}
    assert table["accuracy"].tolist() == [1.0, 1.0]  # the huge box "hits" too: why it is counted


def test_evaluate_localization_on_whole_image_boxes(tmp_path):
    # A box covering the image contains every predicted box: IoBB is 1 at every threshold.
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(3):
        paths[f"img{i}.png"] = str(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8)).save(paths[f"img{i}.png"])
    boxes = pd.DataFrame(
        {"image_id": list(paths) + ["elsewhere.png"], "label": ["Mass", "Nodule", "Mass", "Mass"],
         "x": 0.0, "y": 0.0, "w": 1024.0, "h": 1024.0}
    )
    model = copy.deepcopy(_k_way("resnet50")).train()
    out = tmp_path / "overlays"
    table = evaluate_localization(
        model, get_spec("resnet50"), boxes, paths, LABELS3, data_config=DataConfig(64), out_dir=out, n_overlays=2
    )
    assert model.training  # put back as it was
    assert set(table["measure"]) == {"iou", "iobb"}
    assert len(table) == 3 * (len(IOU_THRESHOLDS) + len(IOBB_THRESHOLDS))  # Mass, Nodule, all
    overall = table[table["label"] == ALL_LABELS]
    assert (overall["n"] == 3).all()  # the box of an image not in `paths` is not scored
    assert (overall.query("measure == 'iobb'")["accuracy"] == 1.0).all()
    assert sorted(p.name for p in out.iterdir()) == ["img0_Mass.png", "img1_Nodule.png"]

    with pytest.raises(ValueError, match="'Atelectasis' not among the model's labels"):
        evaluate_localization(model, get_spec("resnet50"), boxes.assign(label="Atelectasis"), paths, LABELS3)
    with pytest.raises(ValueError, match="none of the box table's images"):
        evaluate_localization(model, get_spec("resnet50"), boxes, {}, LABELS3)
    with pytest.raises(ValueError, match="2 label names for a 3-way classifier"):
        evaluate_localization(model, get_spec("resnet50"), boxes, paths, LABELS3[:2])


@pytest.mark.skipif(not BBOX_CSV.is_file(), reason="shared NIH data not found")
def test_evaluate_localization_on_real_nih_boxes(tmp_path):
    boxes = read_nih_bboxes(BBOX_CSV)
    paths = {i: str(NIH_IMAGES / i) for i in boxes["image_id"] if (NIH_IMAGES / i).is_file()}
    assert len(paths) == 9  # the shared image sample holds nine boxed images
    labels = ("Cardiomegaly", "Infiltration", "Mass", "Nodule", "Pneumonia")
    table = evaluate_localization(
        _k_way("resnet50", k=5), get_spec("resnet50"), boxes, paths, labels, data_config=DataConfig(64), out_dir=tmp_path, n_overlays=1
    )
    assert set(table["label"]) == {*labels, ALL_LABELS}
    assert (table.query("label == 'all'")["n"] == 9).all()
    assert table["accuracy"].between(0, 1).all()
    # Accuracy can only fall as the threshold rises.
    for _, group in table.groupby(["label", "measure"]):
        assert group["accuracy"].is_monotonic_decreasing
    assert len(list(tmp_path.glob("*.png"))) == 1
