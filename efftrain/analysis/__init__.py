"""Scaling-law fitting (``fits``) and plotting (``plots``) for QiD analysis.

Independent of the training code: only numpy, scipy and matplotlib are needed.
"""

from .fits import (
    LAWS,
    REQUIRED_COLUMNS,
    FitResult,
    fit_law,
    fit_table,
    format_table,
    table_to_dict,
    tokens_to_reach,
    tokens_to_reach_ci,
)

__all__ = [
    "LAWS",
    "REQUIRED_COLUMNS",
    "FitResult",
    "fit_law",
    "fit_table",
    "format_table",
    "table_to_dict",
    "tokens_to_reach",
    "tokens_to_reach_ci",
]
