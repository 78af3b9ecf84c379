"""Calibration: whether a predicted 0.7 means 70%. Expected calibration error and reliability
diagrams per class and pooled, and temperature scaling fitted on val.

ECE (Naeini et al. 2015; Guo et al. 2017), for each class's binary probabilities: the scored
entries (mask) put into `bins` equal-width bins on [0, 1], with scikit-learn's
calibration_curve(strategy="uniform") edges (a probability on an edge falls into the lower bin);
ECE = sum over bins of (n_b / n) * |fraction of positives in b - mean probability in b|.
Pooled: every class's scored entries as one set.

Temperature scaling (Guo et al. 2017), one temperature per class: p' = sigmoid(logit(p) / T), T
minimising the negative log-likelihood on val. T > 1 softens an overconfident class. It is monotone,
so it changes no AUROC or ranking, and a threshold t on raw probabilities is the threshold
apply_temperature(t, T) on calibrated ones. Fitted on val only, recorded in <run>/calibration.json;
predictions files keep raw probabilities, heads.predict and the service apply the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.optimize import minimize_scalar

from common.evaluation.text import UNDEFINED, number
from common.runs import rundir

DEFAULT_BINS = 10
T_BOUNDS = (0.02, 50.0)  # a fitted T at a bound says the class's val probabilities carry almost no signal
_CLIP = 1e-7  # probabilities of exactly 0 or 1 (float32 sigmoid saturates) get a finite logit
REPORT_CLASSES = 6  # the reliability diagram's panels beside the pooled one: the most prevalent classes
# Okabe-Ito: told apart with any colour vision; raw and calibrated also differ by marker and line.
RAW_COLOUR, CALIBRATED_COLOUR, COUNT_COLOUR = "#0072B2", "#D55E00", "#999999"


def _mask(y: np.ndarray, mask) -> np.ndarray:
    return np.ones(np.shape(y), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def bin_stats(y, probs, bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: (entries, mean probability, fraction of positives); NaN in empty bins."""
    y, probs = np.asarray(y, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], probs)  # calibration_curve's binning
    counts = np.bincount(ids, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(ids, weights=probs, minlength=bins) / counts
        frac_pos = np.bincount(ids, weights=y, minlength=bins) / counts
    return counts, mean_prob, frac_pos


def ece(y, probs, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error of binary probabilities; NaN without entries."""
    counts, mean_prob, frac_pos = bin_stats(y, probs, bins)
    if not counts.sum():
        return float("nan")
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(frac_pos[full] - mean_prob[full])) / counts.sum())


def calibration_errors(y, probs, mask=None, names=None, bins: int = DEFAULT_BINS) -> dict:
    """{"pooled": ECE over every scored entry, "per_class": {name: ECE over the class's scored entries}}."""
    y, probs = np.asarray(y), np.asarray(probs)
    valid = _mask(y, mask)
    names = list(names) if names is not None else [str(c) for c in range(y.shape[1])]
    return {"pooled": ece(y[valid], probs[valid], bins),
            "per_class": {n: ece(y[valid[:, c], c], probs[valid[:, c], c], bins) for c, n in enumerate(names)}}


def _logit(probs) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _CLIP, 1 - _CLIP)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs, temperature) -> np.ndarray:
    """sigmoid(logit(p) / T) per class: probs (n, k) or (k,) (a run's thresholds), temperature (k,)."""
    z = _logit(probs) / np.asarray(temperature, dtype=np.float64)
    return 1 / (1 + np.exp(-z))


def fittable(y, mask=None) -> np.ndarray:
    """(k,) whether a class has a scored positive and a scored negative: the least a fit needs."""
    y = np.asarray(y)
    valid = _mask(y, mask)
    return ((y == 1) & valid).any(axis=0) & ((y == 0) & valid).any(axis=0)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(z / T) against y, in its overflow-safe form."""
    s = z / temperature
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperature(probs_val, y_val, mask_val=None) -> np.ndarray:
    """(k,) temperatures minimising each class's val NLL (bounded search on log T, T_BOUNDS); 1 for a
    class without a scored positive and negative on val. Give it val only: test is never fitted on."""
    y = np.asarray(y_val, dtype=np.float64)
    z, valid = _logit(probs_val), _mask(y, mask_val)
    out = np.ones(y.shape[1])
    for c in np.flatnonzero(fittable(y, valid)):
        zc, yc = z[valid[:, c], c], y[valid[:, c], c]
        best = minimize_scalar(lambda log_t: _nll(zc, yc, np.exp(log_t)), bounds=np.log(T_BOUNDS),
                               method="bounded", options={"xatol": 1e-5})
        out[c] = float(np.exp(best.x))
    return out


def temperature_notes(y_val, mask_val, temperature, names) -> list[str]:
    """Which classes kept T = 1 (nothing to fit on val) or reached a bound of the search."""
    notes = [f"calibration: {n}: no positive or no negative on val, temperature 1 (probabilities unchanged)"
             for n, ok in zip(names, fittable(y_val, mask_val)) if not ok]
    notes += [f"calibration: {n}: fitted temperature {t:.3g} is at the search bound; its val probabilities carry "
              "little signal" for n, t in zip(names, temperature) if np.isclose(t, T_BOUNDS, rtol=1e-3).any()]
    return notes


def fit_on_val(method: str, probs_val, y_val, mask_val, names) -> tuple[np.ndarray | None, list[str]]:
    """A run's --calibrate: (per-class temperatures, notes) for "temperature", (None, []) for "none"."""
    if method == "none":
        return None, []
    if method != "temperature":
        raise ValueError(f"--calibrate {method!r}: none or temperature")
    temperature = fit_temperature(probs_val, y_val, mask_val)
    return temperature, temperature_notes(y_val, mask_val, temperature, names)


def split_calibration(y, probs, mask, names, temperature=None, bins: int = DEFAULT_BINS,
                      fitted_on: str = "val") -> dict:
    """A split's metrics.json "calibration": ECE of the raw probabilities, and with `temperature`
    (fitted on `fitted_on`, never this split unless it is val) ECE after scaling too."""
    out = {"bins": bins, "ece": calibration_errors(y, probs, mask, names, bins)}
    if temperature is not None:
        out["ece_temperature"] = calibration_errors(y, apply_temperature(probs, temperature), mask, names, bins)
        out["temperature_fitted_on"] = fitted_on
    return out


# --- calibration.json ------------------------------------------------------------------------


def write_calibration(run_dir, label_names, temperature, fitted_on: str = "val") -> Path:
    path = Path(run_dir) / rundir.CALIBRATION
    rundir.write_json(path, {"method": "temperature", "fitted_on": fitted_on,
                             "temperature": {n: float(t) for n, t in zip(label_names, temperature)}})
    return path


def read_calibration(run_dir) -> dict | None:
    """A run's calibration.json, or None when the run was not calibrated."""
    path = Path(run_dir) / rundir.CALIBRATION
    if not path.is_file():
        return None
    record = rundir.read_json(path)
    if record.get("method") != "temperature" or not isinstance(record.get("temperature"), dict):
        raise rundir.RunError(f"{path}: not a temperature calibration this version reads")
    return record


def temperatures(calibration: dict, label_names) -> np.ndarray:
    """(k,) T in the order of `label_names`; a RunError naming a label the file lacks."""
    missing = [n for n in label_names if n not in calibration["temperature"]]
    if missing:
        raise rundir.RunError(f"{rundir.CALIBRATION}: no temperature for {', '.join(missing)}")
    return np.array([float(calibration["temperature"][n]) for n in label_names])


# --- report ----------------------------------------------------------------------------------


_SERIES = (("raw", RAW_COLOUR, "o", "-"), ("temperature-scaled", CALIBRATED_COLOUR, "s", "--"))


def _panel(fig, spec, y, series: list, title: str, bins: int) -> None:
    """One reliability panel: fraction of positives against mean probability per bin for each of
    `series` (raw, and scaled when calibrated), the diagonal, and each bin's entries below."""
    top = fig.add_subplot(spec[0])
    low = fig.add_subplot(spec[1], sharex=top)
    top.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls=":")
    edges = np.linspace(0, 1, bins + 1)
    for p, (label, colour, marker, ls) in zip(series, _SERIES):
        counts, mean_prob, frac_pos = bin_stats(y, p, bins)
        full = counts > 0
        top.plot(mean_prob[full], frac_pos[full], color=colour, marker=marker, ms=3.5, ls=ls, lw=1.2)
        low.stairs(counts, edges, color=colour, ls=ls, fill=label == "raw", alpha=0.35 if label == "raw" else 1)
    top.set(xlim=(0, 1), ylim=(0, 1))
    top.set_title(title, fontsize=8)
    top.set_ylabel("fraction positive", fontsize=8)
    top.tick_params(labelbottom=False, labelsize=7)
    low.set_yscale("symlog", linthresh=1)
    low.set_ylim(bottom=0)
    low.set_xlabel("predicted probability", fontsize=8)
    low.set_ylabel("images", fontsize=8)
    low.tick_params(labelsize=7)


def plot_reliability(pred: dict, names: list[str], title: str, path: Path, bins: int = DEFAULT_BINS,
                     temperature=None) -> None:
    """Reliability diagram: the pooled entries and the REPORT_CLASSES most prevalent classes, raw
    and (with `temperature`, per class) scaled; each panel's title gives its ECE."""
    valid, y, probs = pred["mask"], pred["y"], pred["probs"]
    versions = [probs] if temperature is None else [probs, apply_temperature(probs, temperature)]
    positives = ((y == 1) & valid).sum(axis=0)
    ok = fittable(y, valid)
    classes = [c for c in np.argsort(-positives, kind="stable")[:REPORT_CLASSES] if ok[c]]
    # One label pooled is that label: its own panel alone.
    panels = [("pooled, all classes", y[valid], [v[valid] for v in versions], "")] if len(names) != 1 or not ok[0] else []
    panels += [(f"{names[c]}, {int(positives[c])} positive", y[valid[:, c], c], [v[valid[:, c], c] for v in versions],
                "" if temperature is None else f", T {temperature[c]:.2f}") for c in classes]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(3.3 * columns, 3.7 * rows + 0.5))
    grid = fig.add_gridspec(rows, columns, hspace=0.4, wspace=0.32)
    for i, (label, yc, series, t) in enumerate(panels):
        cell = grid[i // columns, i % columns].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
        errors = " → ".join(number(ece(yc, p, bins)) for p in series)
        _panel(fig, cell, yc, series, f"{label}\nECE {errors}{t}", bins)
    handles = [Line2D([], [], color="0.4", lw=0.8, ls=":", label="perfect calibration")]
    handles += [Line2D([], [], color=c, marker=m, ms=4, ls=ls, label=n) for n, c, m, ls in _SERIES[:len(versions)]]
    # Fixed margins in inches, not bbox_inches="tight": its extra layout pass cost a third of the figure's time.
    height = 3.7 * rows + 0.5
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.suptitle(f"{title}: {bins} equal-width bins; below each, images per bin", fontsize=11, y=1 - 0.08 / height)
    fig.subplots_adjust(left=0.6 / (3.3 * columns), right=1 - 0.15 / (3.3 * columns), bottom=0.5 / height,
                        top=1 - 1.1 / height)
    fig.savefig(path, dpi=110)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def _draw(run: Path, names: list[str], splits: list[str], temperature) -> list[str]:
    """reliability_<split>.png for each split with a predictions file; the markdown image lines."""
    lines = []
    for split in splits:
        pred_file = run / rundir.PREDICTIONS / f"{split}.parquet"
        if pred_file.is_file():
            plot_reliability(rundir.read_predictions(pred_file, names), names, f"Reliability, {split} split",
                             run / rundir.reliability_plot(split), temperature=temperature)
            lines.append(f"![reliability {split}]({rundir.reliability_plot(split)})")
    return lines


def report_lines(metrics: dict, run) -> list[str]:
    """report.md's "Calibration" section, and its reliability_<split>.png files drawn into `run` (None:
    the table alone, as heads.evaluate's report has it)."""
    names, splits = metrics["label_names"], metrics["splits"]
    scored = {s: m["calibration"] for s, m in splits.items() if "calibration" in m}
    if not scored:
        return []  # a run from before calibration was measured
    record = read_calibration(run) if run is not None else None
    temperature = temperatures(record, names) if record else None
    bins = next(iter(scored.values()))["bins"]
    scaled = [s for s, c in scored.items() if "ece_temperature" in c]
    lines = ["", "## Calibration", "",
             f"Expected calibration error (ECE): each class's scored images in {bins} equal-width probability bins, "
             "the image-weighted mean of |fraction positive - mean predicted probability| per bin; 0 is perfect."
             + (" Pooled: every class's scored entries together." if len(names) != 1 else "")]
    if scaled:
        lines.append("Temperature scaling: one temperature T per class, sigmoid(logit(p) / T), fitted on val by "
                     "log-likelihood and recorded in calibration.json; val's ECE after scaling is in-sample, test's "
                     "is the honest one. Predictions files keep the raw probabilities; heads.predict and the "
                     "service apply T. T rescales logits; it cannot remove a shift, such as the one a "
                     "positive-weighted loss (weighted_bce) puts into every probability.")
    columns = [(s, "ece") for s in scored] + [(s, "ece_temperature") for s in scaled]
    header = ["label"] + [f"{s} ECE" + (", T-scaled" if key != "ece" else "") for s, key in columns]
    rows = [["**pooled**"] + [number(scored[s][key]["pooled"]) for s, key in columns]]
    rows += [[name] + [number(scored[s][key]["per_class"].get(name)) for s, key in columns] for name in names]
    if temperature is not None:
        header.append("T")
        rows = [rows[0] + [""]] + [row + [f"{t:.3f}"] for row, t in zip(rows[1:], temperature)]
    if len(names) == 1:
        rows = rows[1:]  # one label pooled is that label: no row repeating it
    lines += [""] + _table(header, rows)
    if any(UNDEFINED in row for row in rows):
        lines += ["", f"{UNDEFINED}: no scored image of the class in that split."]
    drawn = _draw(Path(run), names, list(scored), temperature) if run is not None else []
    return lines + ([""] + drawn if drawn else [])
