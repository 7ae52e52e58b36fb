import os

import pytest
import torch

from fedtp_flwr.server.spill import SpillDir


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
        parked = d.park(src)
        assert list(parked) == list(src) and len(parked) == 4
        for k in want:
            assert _same(parked[k], want[k]) and _same(parked[k], want[k])  # re-read, no cache
        assert sum(os.path.getsize(parked._files[k][0]) for k in parked) == sum(
            v.numel() * v.element_size() for v in want.values())
        assert all(_same(src[k], want[k]) for k in want)  # the caller's tensors are left as they were
        col_file = parked._files["col"][0]
        assert os.path.getsize(col_file) < base.numel() * base.element_size() // 20


def test_pop_deletes_the_file_and_close_removes_the_folders_it_made(tmp_path):
    state = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    d = SpillDir(tmp_path / "new" / "parent")
    parked = d.park(state)
    assert list(state) == ["a", "b"]  # parking leaves the caller's dict alone
    path = parked._files["a"][0]
    x = parked.pop("a")
    assert torch.equal(x, torch.ones(3)) and not os.path.exists(path)
    assert "a" not in parked and list(parked) == ["b"]
    d.close()
    assert not os.path.exists(d.path)
    assert not (tmp_path / "new").exists()  # both folders it created are gone, ...
    assert tmp_path.exists()  # ... and nothing above them
    d.close()  # idempotent
    (tmp_path / "mine").mkdir()
    with SpillDir(tmp_path / "mine") as d:
        d.park(state)
    assert (tmp_path / "mine").exists() and not any((tmp_path / "mine").iterdir())  # an existing parent stays


def test_unwritable_parent_names_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "sub"
    with pytest.raises(OSError, match="spill-dir") as e:
        SpillDir(bad)
    assert str(bad) in str(e.value)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """_same for any shape, empty, 0-d and one-value strided views included (compact copies before the byte view)."""
    def bits(t):
        return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _cases():
    base = torch.randn(9, 6)
    return {"bf16": torch.randn(11, 3).bfloat16(), "fp16": torch.randn(5, 2, 3).half(), "fp32": torch.randn(13),
            "col": base[:, 4], "t": base.t(), "scalar": torch.tensor(2.5), "i64": torch.arange(10).reshape(5, 2),
            "one": base[3:4, 4], "empty": base[2:2].t()}  # one value of a strided view; (6, 0)


@pytest.mark.parametrize("block_values", [1 << 22, 5])  # 5: non-contiguous tensors written a few values at a time
def test_rows_reads_any_range_bit_exact(tmp_path, monkeypatch, block_values):
    from fedtp_flwr.server import aggregation

    monkeypatch.setattr(aggregation, "BLOCK_VALUES", block_values)  # spill writes by aggregation.blocks
    src = _cases()
    with SpillDir(tmp_path) as d:
        parked = d.park(src)
        for k, t in src.items():
            assert parked.shape(k) == t.shape
            assert os.path.getsize(parked._files[k][0]) == t.numel() * t.element_size()  # raw bytes, no header
            assert _same_bits(parked[k], t)
            rows = t.reshape(1) if t.dim() == 0 else t  # a 0-d tensor reads as one row
            n = rows.shape[0]
            for a, b in [(0, n), (0, 1), (n - 1, n), (1, 3), (2, 2), (3, 1), (0, n + 5), (-2, n)]:
                got = parked.rows(k, a, b)
                assert _same_bits(got, rows[a:b]), (k, a, b)
                assert got.is_contiguous() and got.untyped_storage().nbytes() == got.numel() * got.element_size()


def test_rows_reads_only_its_range(tmp_path, monkeypatch):
    """rows() seeks to its first row and reads exactly its bytes (a fresh read each time: nothing cached)."""
    import builtins

    t = torch.randn(100, 8)
    with SpillDir(tmp_path) as d:
        parked = d.park({"w": t})
        reads = []
        real_open = builtins.open

        class Spy:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def seek(self, n):
                reads.append(("seek", n))
                return self.f.seek(n)

            def readinto(self, b):
                n = self.f.readinto(b)
                reads.append(("read", n))
                return n

        monkeypatch.setattr(builtins, "open", lambda *a, **kw: Spy(real_open(*a, **kw)))
        assert torch.equal(parked.rows("w", 10, 13), t[10:13])
        assert reads == [("seek", 10 * 8 * 4), ("read", 3 * 8 * 4)]
        assert torch.equal(parked.rows("w", 10, 13), t[10:13]) and len(reads) == 4


def test_truncated_file_is_an_error(tmp_path):
    with SpillDir(tmp_path) as d:
        parked = d.park({"w": torch.randn(4, 4)})
        with open(parked._files["w"][0], "r+b") as f:
            f.truncate(20)
        with pytest.raises(OSError, match="truncated"):
            parked["w"]
        assert parked.rows("w", 0, 1).shape == (1, 4)  # the first 16 bytes are still there
