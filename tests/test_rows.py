"""model/rows.py: the one row-blocking rule every blocked pass uses."""

import pytest

from fedtp_flwr.model.rows import row_slices, rows_per_block


@pytest.mark.parametrize("n_rows,per_row,budget,start,want", [
    (10, 3, 7, 0, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]),  # 2 rows of 3 values fit in 7
    (10, 3, 9, 0, [(0, 3), (3, 6), (6, 9), (9, 10)]),  # the last block is shorter
    (3, 50, 7, 0, [(0, 1), (1, 2), (2, 3)]),  # a row over the budget is still a block of its own
    (10, 3, 7, 4, [(4, 6), (6, 8), (8, 10)]),  # from `start`
    (0, 5, 10, 0, []),
])
def test_slices_cover_each_row_once_in_order_within_the_budget(n_rows, per_row, budget, start, want):
    assert [(s.start, s.stop) for s in row_slices(n_rows, per_row, budget, start)] == want


def test_rows_per_block_is_at_least_one_row():
    assert [rows_per_block(per_row, 8) for per_row in (1, 3, 8, 9, 0)] == [8, 2, 1, 1, 8]
