"""A lung run's report.md, loss curve and mask overlays (best and worst test images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.runs.rundir import LOSS_PLOT, OVERLAYS, REPORT


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> Image.Image:
    """Gray radiograph; green where both agree, red where the model missed lung, blue where it added some."""
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([gray] * 3, -1).astype(np.float32)
    for where, color in ((truth & pred, (0, 255, 0)), (truth & ~pred, (255, 0, 0)), (~truth & pred, (0, 80, 255))):
        rgb[where] = 0.6 * rgb[where] + 0.4 * np.asarray(color, np.float32)
    return Image.fromarray(rgb.astype(np.uint8))


def loss_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (Dice + BCE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_dice"] for h in history], color="tab:green", label="val Dice")
    ax2.set_ylabel("val Dice")
    ax.legend(handles=ax.get_lines() + ax2.get_lines(), loc="center right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_overlays(out: Path, loaded, arrays: dict, n: int = 3) -> list[str]:
    folder = out / OVERLAYS
    folder.mkdir(exist_ok=True)
    order = arrays["order"]
    picks = [("worst", k) for k in order[:n]] + [("best", k) for k in order[::-1][:n]]
    names = []
    for tag, k in picks:
        name = f"{tag}_{loaded.stems[k]}.png"
        overlay(loaded.images[k], loaded.masks[k], arrays["post"][k]).save(folder / name)
        names.append((tag, loaded.stems[k], float(arrays["dice_post"][k]), f"{OVERLAYS}/{name}"))
    return names


def _table(metrics: dict) -> list[str]:
    lines = ["| split | n | Dice | IoU | Dice (post) | IoU (post) | min Dice (post) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for split, m in metrics.items():
        r, p = m["raw"], m["post"]
        if r["n"]:
            lines.append(f"| {split} | {r['n']} | {r['dice']:.4f} | {r['iou']:.4f} | {p['dice']:.4f} | {p['iou']:.4f} "
                         f"| {p['dice_min']:.4f} |")
    return lines


def write_report(out: Path, title: str, command: str, metrics: dict, history: list[dict] | None,
                 overlays: list, notes: list[str]) -> Path:
    lines = [f"# {title}", "", f"`{command}`", "", *_table(metrics), "",
             "post: the post-processing (lungs/postprocess.py): specks far from every lung dropped, holes up to a "
             "quarter of the mask filled, a lone lung mirrored.", ""]
    if history:
        loss_plot(history, out / LOSS_PLOT)
        lines += ["## Training", "", f"![loss]({LOSS_PLOT})", ""]
    if overlays:
        lines += ["## Test overlays", "", "green: agreed lung, red: lung the model missed, blue: lung it added", ""]
        lines += [f"- {tag} {stem}: Dice {dice:.4f}\n\n  ![{stem}]({path})" for tag, stem, dice, path in overlays]
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    (out / REPORT).write_text("\n".join(lines))
    return out / REPORT
