"""The one exception type for bad data: a ValueError that says where the problem is."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file (and 1-based line, where there is one)."""
