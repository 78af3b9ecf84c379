"""How a metric is written in every report, card and table: one rendering of undefined values.

A metric is undefined where its class had no positives or no negatives (NaN in memory, null in
metrics.json); every report shows it as UNDEFINED, never "nan" or "None".
"""

from __future__ import annotations

import math

UNDEFINED = "—"


def defined(value) -> bool:
    """Whether `value` is a number to print: not None, not NaN or infinite."""
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def number(value, digits: int = 3) -> str:
    """A float to `digits` places, another value as it is, an undefined one as UNDEFINED."""
    if not defined(value):
        return UNDEFINED
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def with_interval(value, low, high, digits: int = 3, interval_digits: int = 2) -> str:
    """"0.812 (0.74-0.88)"; the value alone when the interval is missing; UNDEFINED when the value is."""
    if not defined(value):
        return UNDEFINED
    if not (defined(low) and defined(high)):
        return number(value, digits)
    return f"{number(value, digits)} ({low:.{interval_digits}f}-{high:.{interval_digits}f})"


def entry_with_interval(entry: dict, key: str, digits: int = 3) -> str:
    """`entry[key]` with its `<key>_ci_low` / `<key>_ci_high` interval, as metrics.json holds them."""
    return with_interval(entry.get(key), entry.get(f"{key}_ci_low"), entry.get(f"{key}_ci_high"), digits)


def averaged(names, what: str = "AUROC") -> str:
    """A summary metric's name: "mean AUROC" over several labels, plain "AUROC" for a binary task, whose one
    label is the result and not a mean over one class."""
    return f"mean {what}" if len(names) != 1 else what


def finding_aucs_apply(split: dict, names) -> bool:
    """Whether D-AUC and N-AUC (negatives with another finding, negatives with none) say anything here: not
    when no negative has another finding (every D-AUC undefined) and every N-AUC is the AUROC, as in a
    binary task whose table knows no other finding."""
    per_class = [split["per_class"][n] for n in names]
    return any(defined(e.get("d_auc")) for e in per_class) or any(
        defined(e.get("n_auc")) and e.get("n_auc") != e.get("auroc") for e in per_class)
