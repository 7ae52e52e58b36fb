"""Cutting a tensor into blocks of whole rows: the one way every blocked pass of the project walks a big tensor.

Server passes (the fold, the robust merge, decoding an uploaded update), the client's frozen low-bit rest and
its optimizer step in backward all bound their float32 temporaries the same way: runs of consecutive dim-0 rows
of at most `budget` values (at least one row, however long). Each caller keeps its own budget, next to the
reason for it (aggregation.BLOCK_VALUES, context.ROW_BLOCK_VALUES, loop.STEP_BLOCK_VALUES).
"""

from __future__ import annotations

from typing import Iterator


def rows_per_block(values_per_row: int, budget: int) -> int:
    """How many whole rows of `values_per_row` values fit in `budget` values (at least 1)."""
    return max(1, budget // max(1, values_per_row))


def row_slices(n_rows: int, values_per_row: int, budget: int, start: int = 0) -> Iterator[slice]:
    """Consecutive slices covering rows [start, n_rows), each of at most rows_per_block(values_per_row, budget)
    rows; the last may be shorter."""
    step = rows_per_block(values_per_row, budget)
    for lo in range(start, n_rows, step):
        yield slice(lo, min(lo + step, n_rows))
