"""model/rows.py: the one row-blocking rule every blocked pass uses."""

import pytest

from fedtp_flwr.model.rows import row_slices, rows_per_block


@pytest.mark.parametrize("n_rows,per_row,budget,start", [(10, 3, 7, 0), (10, 3, 9, 0), (10, 50, 7, 0), (10, 3, 7, 4),
                                                         (1, 1, 1, 0), (0, 5, 10, 0)])
def test_slices_cover_each_row_once_in_order_within_the_budget(n_rows, per_row, budget, start):
    parts = list(row_slices(n_rows, per_row, budget, start))
    covered = [i for s in parts for i in range(s.start, s.stop)]
    assert covered == list(range(start, n_rows))
    step = rows_per_block(per_row, budget)
    assert all(1 <= s.stop - s.start <= step for s in parts)
    assert all(s.stop - s.start == step for s in parts[:-1])  # only the last is shorter
    assert step == max(1, budget // per_row)  # a row over the budget is still one block
