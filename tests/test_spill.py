import os

import pytest
import torch

from fedtp_flwr.spill import SpillDir


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def test_round_trip_bit_exact_and_view_writes_only_its_bytes(tmp_path):
    base = torch.randn(512, 512)
    view = base[:, 3]  # non-contiguous column of a 1 MiB storage
    src = {"bf16": torch.randn(7, 5).bfloat16(), "fp16": torch.randn(3, 4).half(), "fp32": torch.randn(6),
           "col": view}
    want = {k: v.clone() for k, v in src.items()}
    with SpillDir(tmp_path / "spill") as d:
        parked = d.park(dict(src), release=False)
        assert list(parked) == list(src) and len(parked) == 4
        for k in want:
            assert _same(parked[k], want[k]) and _same(parked[k], want[k])  # re-read, no cache
        assert parked.nbytes == sum(v.numel() * v.element_size() for v in want.values())
        col_file = parked._files["col"][0]
        assert os.path.getsize(col_file) < base.numel() * base.element_size() // 20


def test_release_empties_input_and_pop_deletes_file(tmp_path):
    state = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    d = SpillDir(tmp_path / "new" / "parent")
    parked = d.park(state)
    assert state == {}
    path = parked._files["a"][0]
    x = parked.pop("a")
    assert torch.equal(x, torch.ones(3)) and not os.path.exists(path)
    assert "a" not in parked and list(parked) == ["b"]
    d.close()
    assert not os.path.exists(d.path)
    d.close()  # idempotent


def test_unwritable_parent_names_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "sub"
    with pytest.raises(OSError, match="spill-dir") as e:
        SpillDir(bad)
    assert str(bad) in str(e.value)
