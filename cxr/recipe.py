"""`cxr recipe TOML --out DIR`: a binary task from a user's table, end to end, in one command.

The route (conf/recipes/shenzhen-tb.toml, docs/recipes.md): fine-tune a backbone on the images (from
the TOML's weights: random here, none pretrained can be downloaded), extract its best.pt's features for
the original and the lung-masked view, train a head on each and on both fused, compare the three heads
and the fine-tuned model on the same test patients (paired DeLong and bootstrap), and write
DIR/results.md with the ROC curves, CAMs of true and false positives and lung overlays. Each step is
the project's own command with its own flags; a step whose recorded command matches is skipped, so a
stopped recipe resumes where it stopped (the fine-tune and the extraction also resume within a step).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import time
import tomllib
from pathlib import Path

from common.config import HelpFormatter, log
from common.evaluation.text import number  # "—" for an undefined value, as every report
from common.runs.command import command_line, run_command

PROG = "cxr recipe"
STAMPS = ".recipe"  # DIR/.recipe/<step>.json: the command a finished step ran
VIEWS = ("original", "masked")
HEADS = {"original": ("original",), "masked": ("masked",), "fused": ("original", "masked")}
REQUIRED = ("metadata", "images", "path-column", "patient-column", "label-column", "backbone", "weights")
MASKED_FINETUNE = ("not run: the fine-tune job reads images as they are and has no lung-masked input "
                   "(the masked view is compared through extracted features)")


class RecipeError(ValueError):
    """A recipe TOML or table that cannot run; one line."""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("recipe", help="recipe TOML, e.g. conf/recipes/shenzhen-tb.toml")
    p.add_argument("--out", required=True, help="folder for every step's output and results.md")
    p.add_argument("--quick", action="store_true", help="apply the TOML's [quick] table: the whole route on a few images")
    return p


def load_recipe(path: str, quick: bool) -> dict:
    """The [recipe] table with its step tables, [quick]'s values laid over it when `quick`."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        doc = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    if "recipe" not in doc:
        raise RecipeError(f"{path}: no [recipe] table")
    recipe = {k: dict(v) if isinstance(v, dict) else v for k, v in doc["recipe"].items()}
    if quick:
        if "quick" not in doc:
            raise RecipeError(f"{path}: --quick given but the file has no [quick] table")
        for key, value in doc["quick"].items():
            recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    missing = [k for k in REQUIRED if not recipe.get(k)]
    if missing:
        raise RecipeError(f"{path}: [recipe] lacks {', '.join(missing)}")
    return recipe


def flags(table: dict) -> list[str]:
    """A step table as command-line flags: true -> a bare flag, false -> left out."""
    argv = []
    for key, value in table.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def write_table(recipe: dict, out: Path) -> tuple[Path, dict]:
    """DIR/table.csv: the user's table (a label-balanced first `limit` rows when set), checked; its counts."""
    source, label = Path(recipe["metadata"]), recipe["label-column"]
    if not source.is_file():
        raise RecipeError(f"metadata {source}: no such file")
    if not Path(recipe["images"]).is_dir():
        raise RecipeError(f"images {recipe['images']}: no such folder")
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    lacking = [c for c in (recipe["path-column"], recipe["patient-column"], label) if c not in columns]
    if lacking:
        raise RecipeError(f"metadata {source}: no column {', '.join(lacking)} (it has {', '.join(columns)})")
    values = {r[label] for r in rows}
    if not values <= {"0", "1"} or len(values) < 2:
        raise RecipeError(f"metadata {source}: {label} must hold 0 and 1 (it holds {', '.join(sorted(values))})")
    limit = int(recipe.get("limit") or 0)
    if limit:  # alternate the classes so a small subset still has both in every split
        by_class = [[r for r in rows if r[label] == v] for v in ("0", "1")]
        rows = [r for pair in zip(*by_class) for r in pair][:limit]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "table.csv"
    text = ",".join(columns) + "\n" + "".join(",".join(r[c] for c in columns) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path, {"images": len(rows), "positive": sum(r[label] == "1" for r in rows)}


class Steps:
    """Runs each step's command unless DIR/.recipe/<step>.json records the same one as finished."""

    def __init__(self, out: Path):
        self.stamps = out / STAMPS
        self.stamps.mkdir(parents=True, exist_ok=True)

    def run(self, step: str, number: str, command: str, argv: list[str], entry) -> bool:
        """Run `cxr command argv` unless it finished before; a step whose command changed starts over
        (--overwrite), one stopped part-way is run again as it was and resumes where the command can."""
        stamp = self.stamps / f"{step}.json"
        line = shlex.join(["cxr", command, *argv])
        before = json.loads(stamp.read_text()).get("command") if stamp.is_file() else None
        if before == line:
            log(f"[{number}] {step}: done before, skipped")
            return False
        log(f"[{number}] {step}: {line}")
        started = time.monotonic()
        stamp.unlink(missing_ok=True)
        entry([*argv, "--overwrite"] if before is not None and "--overwrite" not in argv else argv)
        stamp.write_text(json.dumps({"command": line, "seconds": round(time.monotonic() - started, 1)}) + "\n")
        log(f"[{number}] {step}: finished in {time.monotonic() - started:.0f} s")
        return True


def table_flags(recipe: dict, table: Path) -> list[str]:
    return ["--dataset", "table", "--metadata", str(table), "--images", recipe["images"],
            "--path-column", recipe["path-column"], "--patient-column", recipe["patient-column"],
            "--label-columns", recipe["label-column"], "--split", "ratios",
            "--split-ratios", str(recipe.get("split-ratios", "0.7,0.1,0.2")), "--seed", str(recipe.get("seed", 0))]


def run_route(recipe: dict, out: Path, table: Path, spark=None) -> dict[str, Path]:
    """Steps 1-4; the run and store folders by name."""
    from heads import compare, train
    from jobs import extract, fine_tune

    steps, data = Steps(out), table_flags(recipe, table)
    draws = ["--bootstrap-draws", str(recipe.get("bootstrap-draws", 1000))]
    paths = {"finetune": out / "finetune", **{v: out / "stores" / v for v in VIEWS},
             **{f"head-{h}": out / "heads" / h for h in HEADS}, "compare": out / "compare", "masks": out / "lung-masks"}
    steps.run("finetune", "1/5", "finetune",
              [*data, "--backbone", recipe["backbone"], "--weights", recipe["weights"],
               *flags(recipe.get("finetune", {})), "--out", str(paths["finetune"])], fine_tune.main)
    best = paths["finetune"] / "best.pt"
    for view in VIEWS:
        masked = ["--view", "masked", "--lung-model", recipe.get("lung-model", "default"),
                  "--save-masks", str(paths["masks"])] if view == "masked" else []
        steps.run(f"extract-{view}", "2/5", "extract",
                  [*data, "--backbone", recipe["backbone"], "--weights", str(best), *masked,
                   *flags(recipe.get("extract", {})), "--out", str(paths[view])],
                  lambda argv: extract.main(argv, spark=spark))
    for head, views in HEADS.items():
        steps.run(f"head-{head}", "3/5", "train",
                  # a head takes seconds to minutes: one stopped part-way starts over
                  ["--store", *(str(paths[v]) for v in views), *draws, *flags(recipe.get("train", {})),
                   "--overwrite", "--out", str(paths[f"head-{head}"])], train.main)
    runs = [paths["finetune"], *(paths[f"head-{h}"] for h in HEADS)]
    log("[4/5] compare: the three heads and the fine-tuned model on the same test patients")
    compare.main([*map(str, runs), "--names", "finetune,original,masked,fused", "--reference", "original", *draws,
                  "--overwrite", "--out", str(paths["compare"])])
    return paths


def held_out_scores(run: Path, label: str) -> dict:
    """A run's test AUROC with its interval, AUPRC and counts, from its metrics.json."""
    test = json.loads((run / "metrics.json").read_text())["splits"]["test"]
    return {"n": test["n"], **test["per_class"][label]}


def _cam_figures(run: Path, table: dict, label: str, count: int, folder: Path) -> list[tuple[str, str]]:
    """CAMs of the fine-tuned model's `count` most confident true and false positives on the test split,
    drawn over the image as the model saw it; (caption, file) pairs."""
    import numpy as np
    import pandas as pd
    import torch
    from torch.nn.functional import interpolate

    from finetune.localization import cam_to_boxes, overlay_png
    from finetune.predictor import FinetuneOnImages

    predictions = pd.read_parquet(run / "predictions" / "test.parquet")
    predictor = FinetuneOnImages.from_run(run)
    if predictor.cam is None:
        return []
    threshold = json.loads((run / "metrics.json").read_text())["thresholds"][label]
    positive = predictions[predictions[label] >= threshold].sort_values(label, ascending=False)
    picked = [("true positive", r) for r in positive[positive[f"label:{label}"] == 1].head(count).itertuples()]
    picked += [("false positive", r) for r in positive[positive[f"label:{label}"] == 0].head(count).itertuples()]
    figures, size = [], predictor.data_config.input_size
    for kind, row in picked:
        path = table.get(row.image_id)
        inputs, error = predictor.decode(path) if path else (None, "not found")
        if error:
            continue
        cams = predictor.predict([inputs], [row.image_id]).cams
        cam = interpolate(torch.as_tensor(cams[:1, :1]), size=(size, size), mode="bilinear")[0, 0].numpy()
        gray = predictor.data_config.load(path)
        name = f"cam-{kind.replace(' ', '-')}-{Path(row.image_id).stem}.png"
        overlay_png(np.asarray(gray), cam, None, cam_to_boxes(cam), folder / name,
                    title=f"{kind}: {row.image_id}, p={getattr(row, label):.3f}")
        figures.append((f"{kind}, {row.image_id} (p = {getattr(row, label):.3f}, threshold {threshold:.3f})", name))
    return figures


def _test_ids(run: Path) -> list[str]:
    import pandas as pd

    return sorted(pd.read_parquet(run / "predictions" / "test.parquet", columns=["image_id"])["image_id"])


def _lung_figures(masks: Path, table: dict, ids: list[str], folder: Path) -> list[tuple[str, str]]:
    """The saved lung masks of `ids` tinted over the image in the backbone's geometry; (caption, file) pairs."""
    import numpy as np
    from PIL import Image

    from common.images.data_config import DataConfig
    from common.images.decode import open_image
    from lungs.masking import mask_file_name

    figures = []
    for image_id in ids:
        mask_path = masks / mask_file_name(image_id)
        if not mask_path.is_file() or image_id not in table:
            continue
        mask = np.asarray(open_image(mask_path).convert("L")) > 127
        gray = DataConfig(mask.shape[0]).load(table[image_id])
        rgb = np.repeat(gray[..., None], 3, axis=2)
        rgb[mask] = rgb[mask] * 0.6 + np.array([0.0, 0.4, 0.0])  # lung: green tint
        name = f"lungs-{Path(image_id).stem}.png"
        Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8)).save(folder / name)
        figures.append((f"{image_id}: lung share {mask.mean():.2f}", name))
    return figures


def write_results(recipe: dict, out: Path, paths: dict, counts: dict, command: str, figures: dict) -> Path:
    """DIR/results.md: the routes' test scores, the paired comparison, the figures and the command."""
    label = recipe["label-column"]
    routes = [("fine-tuned model (its own test output)", paths["finetune"]),
              *((f"head on {h} features", paths[f"head-{h}"]) for h in HEADS)]
    weights = recipe["weights"]
    lines = [f"# {label}: results of `{recipe['_file']}`", "",
             f"Made by: `{command}`", "",
             f"{counts['images']} images ({counts['positive']} positive), patient-level split "
             f"{recipe.get('split-ratios', '0.7,0.1,0.2')} (seed {recipe.get('seed', 0)}). Backbone "
             f"{recipe['backbone']} from {'random weights (trained from scratch: no pretrained weights are used)' if weights.startswith('random') else weights}.",
             "", "| route | test AUROC [95% CI] | AUPRC | n (pos/neg) | ROC |", "| --- | --- | --- | --- | --- |"]
    for name, run in routes:
        s = held_out_scores(run, label)
        roc = run / "roc_test.png"
        link = f"[roc]({roc.relative_to(out)})" if roc.is_file() else "-"
        lines.append(f"| {name} | {number(s['auroc'])} [{number(s.get('auroc_ci_low'))}, {number(s.get('auroc_ci_high'))}] "
                     f"| {number(s['auprc'])} | {s['n']} ({s['n_pos']}/{s['n_neg']}) | {link} |")
    lines.append(f"| fine-tune on lung-masked images | {MASKED_FINETUNE} | | | |")
    compared = paths["compare"] / "comparison.md"
    lines += ["", "## Paired comparison (reference: head on original features)", "",
              f"DeLong and the patient-level paired bootstrap of the AUROC difference: [comparison.md]"
              f"({compared.relative_to(out)}).", ""]
    # From the AUROC table on: the runs' folders and settings stay in comparison.md.
    text = compared.read_text() if compared.is_file() else ""
    text = text[text.find("## test AUROC"):] if "## test AUROC" in text else text
    lines += [line.replace("](", "](compare/") if "](" in line and "://" not in line else line
              for line in text.strip().splitlines()]
    for title, key in (("Class activation maps of the fine-tuned model (test split)", "cams"),
                       ("Lung masks of the masked view (test split)", "lungs")):
        lines += ["", f"## {title}", ""]
        lines += [f"- {caption}\n\n  ![{caption}](figures/{name})" for caption, name in figures[key]] or [
            figures.get(f"{key}_none", "none")]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None, prog: str = PROG, spark=None) -> dict:
    args = build_parser(prog).parse_args(argv)
    recipe = load_recipe(args.recipe, args.quick)
    recipe["_file"] = args.recipe
    out = Path(args.out)
    table, counts = write_table(recipe, out)
    log(f"{PROG}: {counts['images']} images, {counts['positive']} positive; every step's output under {out}")
    log(f"fine-tune on lung-masked images: {MASKED_FINETUNE}")
    paths = run_route(recipe, out, table, spark)
    log("[5/5] figures and results.md")
    located = _locate(recipe["images"], table, recipe["path-column"])
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    figures = {"cams": _cam_figures(paths["finetune"], located, recipe["label-column"], int(recipe.get("cams", 3)),
                                    folder)}
    if not figures["cams"]:  # a backbone without CAM (common/models/cam.py says which), or no positive call
        figures["cams_none"] = (f"none: no test image called positive, or no class activation map for "
                                f"{recipe['backbone']} (CAM needs one Linear layer after global pooling; "
                                "common/models/cam.py lists the backbones that have one)")
    figures["lungs"] = _lung_figures(paths["masks"], located, _test_ids(paths["finetune"])[:int(recipe.get("lung-overlays", 4))],
                                     folder)
    results = write_results(recipe, out, paths, counts, command_line(prog, argv), figures)
    log(f"{PROG}: {results}")
    return {"results": str(results), **{k: str(v) for k, v in paths.items()}}


def _locate(images: str, table: Path, path_column: str) -> dict[str, str]:
    """image id -> file: the table's paths under the images folder, keyed as the runs key them."""
    with table.open(newline="") as f:
        names = [r[path_column] for r in csv.DictReader(f)]
    root = Path(images)
    return {**{n: str(root / n) for n in names}, **{Path(n).name: str(root / n) for n in names}}


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
