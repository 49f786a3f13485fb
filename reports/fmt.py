"""How numbers are written in tables, figures and the terminal (one place, so that all agree)."""

from __future__ import annotations

import math
from typing import Any

NORM_LABEL = {"l2": "L2", "linf": "L∞"}


def eps_text(eps: float) -> str:
    """ε for humans: ``8/255`` where ε is a multiple of 1/255 with a long decimal form."""
    k = round(eps * 255)
    if 0 < k < 255 and abs(eps * 255 - k) < 1e-6 and len(f"{eps:g}") > 6:
        return f"{k}/255"
    return f"{eps:g}"


def pct(value: Any, digits: int = 1) -> str:
    """An accuracy in [0, 1] as a percentage without the sign; empty when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * float(value):.{digits}f}"


def num(value: Any) -> str:
    """A bound or ratio: 4 significant digits, ``∞`` for infinity, empty when missing."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        mantissa, exponent = f"{x:.3e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.4g}"


def cell(value: Any) -> str:
    """Any table cell as text (used by the Markdown and HTML writers)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return num(value)
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
