"""Age bands for the subgroup metrics (common/evaluation/subgroups.py): the --age-bands flag's edges,
parsed, named and applied. Light (numpy only), so a command checks the flag before its heavy imports."""

from __future__ import annotations

import math

import numpy as np

AGE_BANDS = (18.0, 40.0, 60.0, 80.0)  # edges in years: <18, 18-40, 40-60, 60-80, 80+; a band holds [low, high)
UNKNOWN = "unknown"  # an image without the attribute (here: no age)


def flag_text(edges=AGE_BANDS) -> str:
    """The edges as --age-bands takes them: "18,40,60,80"."""
    return ",".join(f"{e:g}" for e in edges)


def parse_age_bands(value) -> tuple[float, ...]:
    """--age-bands "18,40,60,80" (or a list) -> increasing positive edges in years; ValueError in one line."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    try:
        edges = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--age-bands {text!r}: comma-separated ages in years, e.g. {flag_text()}") from None
    if not edges or not all(math.isfinite(e) and e > 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--age-bands {text!r}: one or more positive ages in increasing order, e.g. {flag_text()}")
    return edges


def band_names(edges) -> list[str]:
    """The bands' names in order: "<18", "18-40", ..., "80+"."""
    e = [f"{v:g}" for v in edges]
    return [f"<{e[0]}", *[f"{a}-{b}" for a, b in zip(e, e[1:])], f"{e[-1]}+"]


def age_bands(age, edges) -> np.ndarray:
    """Each age's band name (a band holds [low, high) years); UNKNOWN where the age is NaN."""
    age = np.asarray(age, dtype=np.float64)
    names = np.asarray(band_names(edges) + [UNKNOWN], dtype=object)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), age, side="right")
    return names[np.where(np.isnan(age), len(names) - 1, index)]


def add_flag(g) -> None:
    """--age-bands on a parser or argument group, as every command that scores subgroups takes it; the
    command checks it with parse_age_bands."""
    g.add_argument("--age-bands", default=flag_text(), metavar="AGE[,...]",
                   help="edges in years of the subgroup metrics' age bands: 18,40,60,80 gives <18, 18-40, 40-60, "
                        "60-80, 80+")
