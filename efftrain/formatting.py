"""Numbers and tables for people: the one home of efftrain's human-readable formatting.

  format_count     counts (parameters, tokens, tokens/s): 1234567 -> '1.23M'
  format_duration  seconds -> '2h05m', '3m07s', '42s'
  format_value     a measured value (a loss, a QiD, epochs): fixed decimals, e-notation when tiny or huge
  format_estimate  a fitted parameter of any magnitude: four significant digits
  text_table       rows of cells as aligned plain-text columns under a header and a rule
"""

from __future__ import annotations

import math
from typing import Any, Sequence

_COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))


def format_count(n: float | None) -> str:
    """Three significant digits with k / M / B / T: 512 -> '512', 1234567 -> '1.23M', 999_999 -> '1M';
    'n/a' for None."""
    if n is None:
        return "n/a"
    rounded = abs(float(f"{n:.3g}"))  # 999,999 rounds to 1.00e6: that is 1M, not 1e+03k
    for unit, size in _COUNT_UNITS:
        if rounded >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_value(x: Any, digits: int = 3) -> str:
    """`digits` decimals below 10, fewer above; e-notation below 1e-3 and from 1e5; 'n/a' for None,
    non-numbers and non-finite values."""
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.{max(digits - 2, 1)}f}"


def format_estimate(x: float | None) -> str:
    """Four significant digits; e-notation below 1e-3 and from 1e4; 'nan', 'inf', '-inf' spelled out."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e4):
        return f"{x:.3e}"
    return f"{x:.4g}"


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell (left-aligned, right-aligned for the indices in `right`),
    two spaces apart, the header over a rule of dashes; trailing spaces dropped."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
