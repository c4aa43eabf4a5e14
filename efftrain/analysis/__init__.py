"""QiD analysis: scaling-law fits (``fits``), the statistics behind every interval (``stats``), plots
(``plots``) and the grid report (``report``).

The fits, statistics and plots need only numpy, scipy and matplotlib; the report also reads the runs'
directories (efftrain.train.rundir) for their metrics.
"""

from . import stats
from .fits import (
    LAWS,
    PUBLISHED,
    PUBLISHED_NOTES,
    REQUIRED_COLUMNS,
    ExcludedRow,
    FitResult,
    fit_law,
    fit_table,
    format_param,
    format_published,
    format_table,
    table_to_dict,
    tokens_to_reach,
    tokens_to_reach_ci,
)
from .stats import Interval

__all__ = [
    "LAWS",
    "PUBLISHED",
    "PUBLISHED_NOTES",
    "REQUIRED_COLUMNS",
    "ExcludedRow",
    "FitResult",
    "Interval",
    "fit_law",
    "fit_table",
    "format_param",
    "format_published",
    "format_table",
    "stats",
    "table_to_dict",
    "tokens_to_reach",
    "tokens_to_reach_ci",
]
