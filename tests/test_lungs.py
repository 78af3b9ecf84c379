"""Lung segmentation: metrics, post-processing, pairing and split, augmentation, training, the CLI, the shipped model."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.splits import assign_groups
from lungs.data import augment, load_pairs, pair_files, read_mask
from lungs.metrics import dice_iou, per_image, summary
from lungs.model import DEFAULT, LungModelError, UNet, load_lung_model, predict_masks, read_lung_checkpoint, save_lung_model
from lungs.postprocess import postprocess, postprocess_all
from lungs.train import loss_fn, stop_reason
from tests.data_paths import LUNGS, needs_lungs


# --- metrics -------------------------------------------------------------------------------

def test_dice_and_iou_by_hand():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 pixels
    truth[0, 1:4] = truth[1, 1:4] = True  # 6 pixels, 3 shared
    dice, iou = dice_iou(pred, truth)
    assert dice == pytest.approx(2 * 3 / 10) and iou == pytest.approx(3 / 7)


def test_empty_against_empty_is_perfect_and_empty_against_lung_is_zero():
    empty, full = np.zeros((3, 3), bool), np.ones((3, 3), bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)
    assert dice_iou(empty, full) == (0.0, 0.0)
    d, i = per_image(np.stack([empty, full]), np.stack([empty, empty]))
    assert list(d) == [1.0, 0.0] and summary(d, i)["dice"] == 0.5


# --- post-processing -----------------------------------------------------------------------

def _lungs(size=64):
    """Two lung-like blocks either side of the midline."""
    m = np.zeros((size, size), bool)
    m[16:48, 10:26] = True
    m[16:48, 38:54] = True
    return m


def test_a_speck_near_the_center_goes_before_a_lung():
    m = _lungs()
    m[31:33, 31:33] = True  # tiny, right at the center
    out, fired = postprocess(m)
    assert fired["keep"] and np.array_equal(out, _lungs())


def test_a_small_collapsed_lung_is_kept_not_replaced_by_a_mirror():
    m = _lungs()
    m[16:48, 38:54] = False
    m[40:48, 44:48] = True  # 32 px: 6 % of its partner
    out, fired = postprocess(m)
    assert fired == {"keep": False, "fill": False, "mirror": False} and np.array_equal(out, m)


def test_a_lone_lung_is_mirrored_across_the_midline():
    m = _lungs()
    m[:, 32:] = False
    out, fired = postprocess(m)
    assert fired == {"keep": False, "fill": False, "mirror": True}
    assert np.array_equal(out, _lungs())


def test_a_region_across_the_midline_is_not_mirrored():
    m = np.zeros((64, 64), bool)
    m[16:48, 10:54] = True  # both lungs merged
    out, fired = postprocess(m)
    assert not fired["mirror"] and np.array_equal(out, m)


def test_holes_are_filled_and_the_steps_are_counted():
    holed = _lungs()
    holed[25:30, 15:20] = False
    lone = _lungs()
    lone[:, 32:] = False
    out, counts = postprocess_all(np.stack([holed, lone, _lungs()]))
    assert counts == {"keep": 0, "fill": 1, "mirror": 1}
    assert np.array_equal(out[0], _lungs()) and np.array_equal(out[2], _lungs())


def test_steps_switched_off_neither_run_nor_count():
    lone = _lungs()
    lone[:, 32:] = False
    out, fired = postprocess(lone, keep=False, fill=False, mirror=False)
    assert fired == {} and np.array_equal(out, lone)
    assert postprocess_all(np.stack([lone]), mirror=False)[1] == {"keep": 0, "fill": 0}


# --- data ----------------------------------------------------------------------------------

def _write_pairs(root, n=3, size=32):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / "images" / f"p{k}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[8:24, 4:14] = 255
        Image.fromarray(mask).save(root / "masks" / f"p{k}.png")
    return root / "images", root / "masks"


def test_pairs_match_by_stem_and_a_missing_mask_is_reported(tmp_path):
    images, masks = _write_pairs(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "lonely.jpg")
    (masks / "p1.png").rename(masks / "p1.bmp")  # another suffix still pairs
    pairs = pair_files(images, masks)
    assert pairs.stems == ["p0", "p1", "p2"]
    assert pairs.unpaired == [f"{images / 'lonely.jpg'}: no mask of stem 'lonely' in {masks}"]


def test_no_pair_at_all_is_one_line_naming_the_flags(tmp_path):
    images, masks = _write_pairs(tmp_path)
    for f in masks.iterdir():
        f.rename(f.with_name("x" + f.name))
    with pytest.raises(FileNotFoundError, match="no image and mask share a file stem"):
        pair_files(images, masks)


def test_a_corrupt_pair_is_reported_and_skipped(tmp_path):
    images, masks = _write_pairs(tmp_path)
    (images / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = []
    loaded = load_pairs(pair_files(images, masks), ["p0", "p1", "p2"], 16, log=lines.append)
    assert loaded.stems == ["p0", "p2"] and loaded.images.shape == (2, 16, 16) and loaded.masks.dtype == bool
    assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith("p1: skipped") and lines == loaded.skipped
    assert 0 <= loaded.images.min() and loaded.images.max() <= 1


def test_masks_of_0_1_and_0_255_binarize_alike(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 2:8] = 1
    Image.fromarray(m).save(tmp_path / "one.png")
    Image.fromarray(m * 255).save(tmp_path / "full.png")
    Image.fromarray(m * 100).save(tmp_path / "dim.png")  # below half range: not lung
    assert np.array_equal(read_mask(str(tmp_path / "one.png"), 16), m.astype(bool))
    assert np.array_equal(read_mask(str(tmp_path / "full.png"), 16), m.astype(bool))
    assert not read_mask(str(tmp_path / "dim.png"), 16).any()


def test_the_split_is_seeded_and_keeps_a_group_together():
    stems = [f"pat{p}_img{i}" for p in range(20) for i in range(3)]
    group = lambda s: s.split("_")[0]  # noqa: E731
    owner = assign_groups(map(group, stems), (0.6, 0.2, 0.2), seed=1, flag="--split")
    assert owner == assign_groups(map(group, reversed(stems)), (0.6, 0.2, 0.2), seed=1, flag="--split")
    assert owner != assign_groups(map(group, stems), (0.6, 0.2, 0.2), seed=2, flag="--split")
    assert sorted(owner) == sorted({group(s) for s in stems})  # each group once, so it never straddles two splits
    per_split = {name: [s for s in stems if owner[group(s)] == name] for name in ("train", "val", "test")}
    assert [len(per_split[s]) for s in ("train", "val", "test")] == [36, 12, 12]


def test_augmentation_without_ranges_is_the_identity_and_masks_stay_binary():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    same_x, same_y = augment(x, y, g, rotate=0, scale=(1, 1), shift=0, brightness=0, contrast=0, gamma=0)
    assert torch.allclose(same_x, x, atol=1e-5) and torch.equal(same_y, y)
    ax, ay = augment(x, y, g)
    assert ax.shape == x.shape and set(ay.unique().tolist()) <= {0.0, 1.0}
    assert not torch.allclose(ax, x, atol=1e-3) and 0 <= ax.min() and ax.max() <= 1


# --- model and training --------------------------------------------------------------------

def test_the_checkpoint_stores_fp16_and_loads_fp32_in_eval_mode(tmp_path):
    model = UNet(base=4, depth=2)
    config = {"size": 32, "base": 4, "depth": 2}
    save_lung_model(model, config, tmp_path / "m.pt", {"images": "x"}, {"test": 1})
    obj = read_lung_checkpoint(tmp_path / "m.pt")
    assert obj["state_dict"]["head.weight"].dtype == torch.float16
    loaded, got = load_lung_model(tmp_path / "m.pt")
    assert got == config and not loaded.training and loaded.head.weight.dtype == torch.float32
    assert torch.allclose(loaded.head.weight, model.head.weight, atol=1e-3)
    masks = predict_masks(loaded, np.random.default_rng(0).random((3, 32, 32), dtype=np.float32))
    assert masks.shape == (3, 32, 32) and masks.dtype == bool


def test_a_foreign_file_is_one_line(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(LungModelError, match=r"x.pt: not a cxr-features/lungs version 1 checkpoint"):
        load_lung_model(tmp_path / "x.pt")
    with pytest.raises(LungModelError, match="not found"):
        load_lung_model(tmp_path / "absent.pt")


@needs_lungs
def test_a_few_steps_on_real_pairs_lower_the_loss():
    torch.manual_seed(0)
    pairs = pair_files(LUNGS / "images", LUNGS / "masks")
    loaded = load_pairs(pairs, pairs.stems[:4], 64)
    x = torch.from_numpy(loaded.images)[:, None]
    y = torch.from_numpy(loaded.masks.astype(np.float32))[:, None]
    model = UNet(base=8, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_training_stops_for_the_first_reason_that_holds():
    flags = SimpleNamespace(max_minutes=5.0, max_steps=None, patience=2)
    assert stop_reason(flags, timed_out=False, since_best=1) is None
    assert stop_reason(flags, timed_out=False, since_best=2) == "no better val Dice in 2 epochs"
    assert stop_reason(flags, timed_out=True, since_best=2) == "--max-minutes 5.0 reached"
    assert stop_reason(SimpleNamespace(max_minutes=None, max_steps=3, patience=2), False, 2) == "--max-steps 3"
    assert stop_reason(SimpleNamespace(max_minutes=None, max_steps=None, patience=0), False, 99) is None


@pytest.mark.parametrize("argv", [["train", "--split", "0.6, 0.2,0.2"], ["evaluate", "--split", "test"]])
def test_settings_are_one_frozen_picklable_record_per_subcommand(argv):
    """Each subcommand's flags become one typed record (lungs.settings), built without touching the parsed
    flags; it records them as runs always did: the subcommand, then the flags in the parser's order."""
    import argparse
    import dataclasses
    import pickle

    from jobs.lung_model import build_parser, settings_from
    from lungs.settings import LungEvaluateSettings, LungTrainSettings

    parser = build_parser()
    args = parser.parse_args([*argv, "--images", "i", "--masks", "m", "--out", "o"])
    before = dict(vars(args))
    settings = settings_from(args)
    assert vars(args) == before
    assert type(settings) is {"train": LungTrainSettings, "evaluate": LungEvaluateSettings}[argv[0]]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    assert [f.name for f in dataclasses.fields(settings)] == [a.dest for a in sub._actions if a.dest != "help"]
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.out = "x"
    recorded = settings.to_dict()
    assert list(recorded) == list(before) and recorded["command"] == argv[0]
    assert recorded["split"] == ([0.6, 0.2, 0.2] if argv[0] == "train" else "test")


@needs_lungs
def test_train_and_evaluate_write_their_run_directories(tmp_path, monkeypatch):
    from jobs.lung_model import main

    root = tmp_path / "data"
    for side in ("images", "masks"):
        (root / side).mkdir(parents=True)
        for f in sorted((LUNGS / side).iterdir())[:10]:
            shutil.copy(f, root / side / f.name)
    (root / "images" / "CHNCXR_9999_0.png").write_bytes(b"not a png")  # a corrupt pair
    shutil.copy(root / "masks" / "CHNCXR_0001_0.png", root / "masks" / "CHNCXR_9999_0.png")
    flags = ["--images", str(root / "images"), "--masks", str(root / "masks"), "--threads", "1"]
    got = main(["train", *flags, "--out", str(tmp_path / "run"), "--size", "32", "--base", "4", "--depth", "2",
                "--batch-size", "4", "--epochs", "2", "--split", "0.6,0.2,0.2"])
    run = tmp_path / "run"
    assert {"config.json", "metrics.json", "report.md", "best.pt", "loss.png", ".cxr-run.json"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and set(metrics["splits"]) == {"train", "val", "test"}
    assert {"raw", "post", "postprocess_fired", "worst", "per_image"} <= set(metrics["splits"]["test"])
    assert any(line.startswith("CHNCXR_9999_0: skipped") for s in metrics["splits"].values() for line in s["skipped"])
    assert got["splits"]["test"]["post"]["n"] == len(metrics["splits"]["test"]["per_image"])
    assert list((run / "overlays").glob("worst_*.png")) and "![loss](loss.png)" in (run / "report.md").read_text()
    obj = read_lung_checkpoint(run / "best.pt")
    assert set(obj["data"]["split"]) == {"train", "val", "test"} and "test" in obj["metrics"]
    recorded = json.loads((run / "config.json").read_text())["settings"]
    assert recorded["command"] == "train" and recorded["split"] == [0.6, 0.2, 0.2] and recorded["size"] == 32

    out = main(["evaluate", "--model", str(run / "best.pt"), *flags, "--out", str(tmp_path / "eval"), "--worst", "3"])
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())["splits"]["all"]
    assert len(scored["per_image"]) == 10 and len(scored["worst"]) == 3
    assert scored["worst"][0]["dice_post"] <= scored["worst"][-1]["dice_post"]
    assert out["splits"]["all"]["raw"]["n"] == 10
    test = main(["evaluate", "--model", str(run / "best.pt"), *flags, "--out", str(tmp_path / "eval-test"), "--split", "test"])
    assert [r["stem"] for r in test["splits"]["test"]["per_image"]] == obj["data"]["split"]["test"]
    with pytest.raises(ValueError, match="a run is already here; pass --overwrite"):
        main(["evaluate", "--model", str(run / "best.pt"), *flags, "--out", str(tmp_path / "eval")])

    # Shipping the run makes it the model "default" names, with its provenance beside it.
    import lungs.model
    from lungs import ship

    monkeypatch.setattr(lungs.model, "DEFAULT", tmp_path / "models" / "default.pt")
    ship.main(["--run", str(run)])
    card = json.loads((tmp_path / "models" / "default.json").read_text())
    assert "CC BY-NC-SA 4.0" in card["licence"] and card["split_seed"] == 0 and card["command"].startswith("jobs/lung_model.py train")
    assert card["metrics"]["test"]["post"] == metrics["splits"]["test"]["post"]
    assert load_lung_model("default")[1] == {"size": 32, "base": 4, "depth": 2}


@needs_lungs
@pytest.mark.skipif(not DEFAULT.is_file(), reason=f"no shipped model at {DEFAULT}")
def test_the_shipped_model_segments_its_own_test_split():
    model, config = load_lung_model("default")
    test = read_lung_checkpoint(DEFAULT)["data"]["split"]["test"]
    pairs = pair_files(LUNGS / "images", LUNGS / "masks")
    loaded = load_pairs(pairs, test[:12], config["size"])
    clean, _ = postprocess_all(predict_masks(model, loaded.images))
    dice, iou = per_image(clean, loaded.masks)
    assert dice.mean() >= 0.90, dice


def test_qa_flags_name_masks_that_look_wrong():
    from lungs.masking import qa_flags

    two = np.zeros((64, 64), bool)
    two[16:48, 10:28] = two[16:48, 36:54] = True
    assert qa_flags(two) == []
    assert qa_flags(np.zeros((64, 64), bool)) == ["empty"]
    one = np.zeros((64, 64), bool)
    one[30:34, 30:34] = True
    assert qa_flags(one) == ["one_region", "too_small"]
    assert qa_flags(np.ones((64, 64), bool)) == ["one_region", "too_large"]


@needs_lungs
def test_masked_inputs_keep_the_lungs_on_real_nih_films():
    from common.images.data_config import DataConfig
    from lungs.masking import mask_inputs
    from tests.data_paths import NIH_IMAGES

    paths = sorted(NIH_IMAGES.glob("*.png"))[:4]
    if not paths:
        pytest.skip("NIH images not present")
    cfg = DataConfig(224)  # a backbone's own input: the mask is made in that geometry, at the lung model's size
    model, config = load_lung_model("default")
    view = DataConfig(config["size"])
    images, views = (np.stack(batch) for batch in zip(*(cfg.load_with(view, str(p)) for p in paths)))
    assert np.array_equal(images, np.stack([cfg.load(str(p)) for p in paths]))  # PNGs: one decode, the same input
    out = mask_inputs(model, images, views)
    assert out.images.shape == images.shape and out.masks.shape == images.shape
    # Outside the mask black, inside the image untouched.
    assert (out.images[~out.masks] == 0).all() and np.array_equal(out.images[out.masks], images[out.masks])
    np.testing.assert_allclose(out.lung_fraction, out.masks.reshape(4, -1).mean(1), rtol=1e-6)
    # Real adult films: both lungs found, a plausible share of the image, no QA flag.
    assert ((out.lung_fraction > 0.1) & (out.lung_fraction < 0.5)).all(), out.lung_fraction
    assert out.qa == [[], [], [], []]


@needs_lungs
def test_a_small_backbone_input_is_masked_by_the_lung_model_at_its_own_size():
    """At 64 px the lung model still sees the film at its own 256 px (what it was trained on); the mask comes
    down to the backbone's 64 px. Run as a Spark task runs it (common.features.extraction.extract_frame)."""
    import pandas as pd

    from common.images.data_config import DataConfig
    from common.features.extraction import extract_frame
    from common.models.inference import FeatureExtractor
    from lungs.masking import LungMasker

    paths = sorted((LUNGS / "images").glob("*.png"))[::60][:8]
    rows = pd.DataFrame({"image_id": [p.name for p in paths], "patient_id": "p", "view": "PA", "age": 40.0,
                         "sex": 1, "labels": [[]] * len(paths), "split": "train", "path": [str(p) for p in paths]})
    extractor = FeatureExtractor("mobilenet_v3_large", None, 0, precision="fp32", threads=1,
                                 data_config=DataConfig(64))
    out = extract_frame(rows, extractor, transform=LungMasker("default"))
    assert out["error"].isna().all()
    # Both lungs of a real adult film: a plausible share of the input, and masks that pass QA.
    assert (out["lung_fraction"] > 0.1).all() and (out["lung_fraction"] < 0.6).all(), out["lung_fraction"].tolist()
    assert (out["lung_qa"] == "ok").mean() >= 0.75, out["lung_qa"].tolist()


def test_mask_file_names_stay_in_their_folder_and_never_collide():
    from lungs.masking import mask_file_name

    assert mask_file_name("00000001_000.png") == "00000001_000.png"
    hostile = ["../../etc/passwd", "a/b.png", "a_b.png", "a b.png", "..", "", "patient1/study1/view1_frontal.jpg"]
    names = [mask_file_name(i) for i in hostile]
    assert len(set(names)) == len(names)
    assert all("/" not in n and not n.startswith(".") and n.endswith(".png") for n in names)


def test_mask_file_names_differ_for_ids_that_differ_only_by_extension_or_case():
    """One table may hold chest.png and chest.jpg, x.dcm and x, CHEST.png and chest.png: each keeps its own mask,
    also on a case-insensitive file system (macOS, Windows), and no hashed name can be another id's plain name."""
    from lungs.masking import mask_file_name

    ids = ["chest.png", "chest.jpg", "chest.dcm", "chest", "x.dcm", "x", "CHEST.png", "Chest.PNG", "chest.PNG",
           "a/chest.png", "a_chest.png", "CHNCXR_0001_0.png"]
    names = [mask_file_name(i) for i in ids]
    assert len({n.lower() for n in names}) == len(ids), dict(zip(ids, names))
    plain = {n for n in names if n in ids}
    assert plain == {"chest.png", "a_chest.png"}  # lower-case PNG names stay as they are
    # No id's plain name is a hashed name, whatever its case: taken as an id, a hashed name is hashed again.
    assert all(mask_file_name(n.lower()) != n.lower() for n in names if n not in plain)


def test_postprocess_never_drops_a_lung_however_many_regions_or_where():
    """LeDNet's 'two regions nearest the center' dropped a real lung when a third large region was nearer the
    center, or a lung lay off center (a cropped view); only specks far from every lung go now."""
    m = _lungs()
    m[4:12, 28:36] = True  # a third region of lung size near the top center
    m[40:60, 0:6] = True  # a large region at the edge
    out, fired = postprocess(m, fill=False, mirror=False)
    assert np.array_equal(out, m) and not fired["keep"]
    split = _lungs()
    split[30:32, :] = False  # a lung cut in two by a tube: four parts, all kept
    assert np.array_equal(postprocess(split, fill=False, mirror=False)[0], split)
    beside = _lungs(128)
    beside[14, 12] = True  # a one-pixel piece 2 px beside a lung stays; the same speck in a far corner goes
    assert postprocess(beside, fill=False, mirror=False)[0][14, 12]
    far = _lungs(128)
    far[120, 120] = True
    assert not postprocess(far, fill=False, mirror=False)[0][120, 120]


def test_fill_closes_small_holes_but_not_the_heart_between_joined_lungs():
    ring = np.zeros((64, 64), bool)
    ring[10:54, 8:56] = True
    ring[18:46, 24:40] = False  # a large hole: the heart, the lungs joined above and below it
    assert np.array_equal(postprocess(ring, keep=False, mirror=False)[0], ring)
    holed = _lungs()
    holed[30:33, 16:19] = False
    assert np.array_equal(postprocess(holed, keep=False, mirror=False)[0], _lungs())


def _planted(size=96):
    """An asymmetric planted shape: the image is bright exactly where the mask is."""
    mask = np.zeros((size, size), bool)
    mask[20:70, 14:40] = True
    mask[30:80, 56:84] = True
    mask[20:26, 60:90] = True
    return mask.astype(np.float32) * 0.8 + 0.1, mask


@pytest.mark.parametrize("kind", ["contrast", "opacity", "lines", "text", "crop", "lowres", "portable"])
def test_each_hard_film_keeps_image_and_mask_aligned_and_repeats(kind):
    from lungs.hardfilms import hard_set

    image, mask = _planted()
    images, masks = hard_set(image[None].repeat(3, 0), mask[None].repeat(3, 0), kind, seed=1)
    again = hard_set(image[None].repeat(3, 0), mask[None].repeat(3, 0), kind, seed=1)
    assert np.array_equal(images, again[0]) and np.array_equal(masks, again[1])
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1 and masks.dtype == bool
    if kind == "crop":  # the planted image, moved, is still bright exactly where the moved mask is
        for k in range(3):
            assert dice_iou(images[k] > 0.45, masks[k])[0] > 0.95
    elif kind == "portable":  # artifacts on top: the moved lung is still the brighter part
        for k in range(3):
            assert images[k][masks[k]].mean() > images[k][~masks[k]].mean() + 0.1
    else:
        assert np.array_equal(masks, mask[None].repeat(3, 0))  # the lung does not move: only the image changes
    assert not np.array_equal(images[0], image)


def test_film_looks_in_training_move_the_mask_with_the_image():
    import torch

    from lungs.data import augment, film_looks

    image, mask = _planted(64)
    images = np.stack([image] * 8)
    masks = np.stack([mask] * 8)
    rng = np.random.default_rng(0)
    looked, moved = film_looks(images, masks, rng, p=1.0)
    assert looked.shape == images.shape and moved.dtype == bool
    for k in range(8):
        assert looked[k][moved[k]].mean() > looked[k][~moved[k]].mean() + 0.1
    x = torch.from_numpy(images)[:, None]
    y = torch.from_numpy(masks.astype(np.float32))[:, None]
    a = augment(x, y, torch.Generator().manual_seed(3), films=1.0)
    b = augment(x, y, torch.Generator().manual_seed(3), films=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded by the torch generator: a run repeats
    plain_x, plain_y = augment(x, y, torch.Generator().manual_seed(3), films=0.0, contrast=0, brightness=0, gamma=0)
    assert dice_iou(plain_x[:, 0].numpy() > 0.45, plain_y[:, 0].numpy() >= 0.5)[0] > 0.95


def test_training_on_from_a_model_keeps_its_split_and_needs_its_shape(tmp_path):
    """--init: the model's val and test patients stay out of train; new pairs join train; another U-Net is refused."""
    from types import SimpleNamespace

    from lungs.train import split_of

    config = {"size": 32, "base": 4, "depth": 2}
    save_lung_model(UNet(4, 2), config, tmp_path / "m.pt",
                    {"split": {"train": ["a", "b"], "val": ["c"], "test": ["d"]}}, {})
    settings = SimpleNamespace(init=str(tmp_path / "m.pt"), size=32, base=4, depth=2)
    split, init = split_of(settings, ["a", "b", "c", "d", "e"])
    assert split == {"train": ["a", "b", "e"], "val": ["c"], "test": ["d"]} and init["config"] == config
    with pytest.raises(ValueError, match=r"--init .*m.pt: a U-Net of"):
        split_of(SimpleNamespace(init=str(tmp_path / "m.pt"), size=64, base=4, depth=2), ["a"])
