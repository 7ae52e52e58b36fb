"""Park client replies on disk while they wait to be merged.

Some replies cannot be merged on arrival (the outlier check needs three replies to judge the first two; the robust
median needs every reply of a rank group). Held in RAM, the server's memory would grow with the number of clients
(up to ~4.4 GB per reply at Llama 3.2 3B). SpillDir.park writes a reply one file per tensor: the tensor's raw bytes in
C order, its dtype and shape kept beside the path in the SpilledState (a non-contiguous view is written a block at a
time, aggregation.blocks, so parking copies at most one block, never the whole tensor). What holds memory
afterwards: only what a reader asks for. SpilledState[k] reads one whole tensor
back; SpilledState.rows(k, a, b) reads rows [a, b) of dim 0 alone (a seek and one read into a fresh tensor; no cache,
no mmap), which is how the robust merge keeps one block of rows per reply resident, not one tensor.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import torch

from fedtp_flwr.model.quant import QTensor

from .aggregation import blocks


def _disk_error(where: str, e: OSError) -> OSError:
    return OSError(f"cannot park client replies on disk under {where}: point spill-dir at a writable directory with "
                   f"free space, or free space there ({e})")


def _as_bytes(t: torch.Tensor):
    """The bytes of a contiguous tensor as a numpy uint8 array sharing its memory (any dtype, bfloat16 included)."""
    flat = t.reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:  # one value of a strided view counts as contiguous: copy it
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy()


def _write(f, t: torch.Tensor) -> None:
    """t's values in C order: in one write if contiguous, else a compact copy of one block at a time."""
    if t.is_contiguous() or t.dim() == 0:
        f.write(_as_bytes(t))
        return
    for (b,) in blocks(t):
        f.write(_as_bytes(b.contiguous()))


class SpilledState(Mapping):
    """A parked reply: name -> tensor, in the original order; every read loads from disk what it asks for."""

    def __init__(self, files: dict[str, tuple[str, torch.dtype, torch.Size]],
                 quantized: dict[str, tuple[str, str, int, tuple[int, int], int | None]] | None = None):
        self._files = files  # name -> (path, dtype, shape)
        # an uploaded update (a QTensor): name -> (its data's key, its scale's key, bits, shape, group size) in _files
        self._quantized = quantized or {}

    def _read(self, k: str, first: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A fresh tensor of `shape` filled from k's file, starting at its element `first` (f.seek + f.readinto)."""
        path, dtype, _ = self._files[k]
        out = torch.empty(shape, dtype=dtype)
        if out.numel() == 0:
            return out
        buf = memoryview(_as_bytes(out))
        with open(path, "rb", buffering=0) as f:
            f.seek(first * out.element_size())
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done:])
                if not n:
                    raise OSError(f"parked tensor {k!r} in {path} is truncated: {done} of {len(buf)} bytes read")
                done += n
        return out

    def __getitem__(self, k: str) -> torch.Tensor:
        if k in self._quantized:
            data, scale, bits, shape, group = self._quantized[k]
            return QTensor(self[data], self[scale], bits, shape, group)
        return self._read(k, 0, tuple(self.shape(k)))

    def shape(self, k: str) -> torch.Size:
        """k's shape, without reading it."""
        return self._files[k][2]

    def rows(self, k: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of k's dim 0 (slice semantics: clipped to the tensor), read alone from disk; shape
        (stop - start, *shape[1:]). A 0-d tensor reads as one row of shape (1,)."""
        shape = tuple(self.shape(k)) or (1,)
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(start, stop)
        row = math.prod(shape[1:])
        return self._read(k, start * row, (stop - start, *shape[1:]))

    def _parts(self) -> set[str]:
        return {part for data, scale, *_ in self._quantized.values() for part in (data, scale)}

    def __iter__(self) -> Iterator[str]:
        parts = self._parts()
        return iter([k for k in self._files if k not in parts] + list(self._quantized))

    def __len__(self) -> int:
        return len(self._files) - len(self._parts()) + len(self._quantized)

    def pop(self, k: str) -> torch.Tensor:
        """Load k, delete its file(s) and forget it (WeightedFold.add(release=True) drains a reply this way)."""
        t = self[k]
        for key in self._quantized.pop(k)[:2] if k in self._quantized else (k,):
            os.remove(self._files.pop(key)[0])
        return t


class SpillDir:
    """One round's parked replies, in a temporary directory under parent; close() removes it and all in it, and
    the folders above it that this SpillDir created (none is left behind that the operator did not make)."""

    def __init__(self, parent: str | os.PathLike):
        parent = os.path.abspath(parent)
        self._made: list[str] = []  # parent and its missing ancestors, deepest first
        p = parent
        while not os.path.exists(p):
            self._made.append(p)
            p = os.path.dirname(p)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix="fedtp-spill-", dir=parent)
        except OSError as e:
            self._remove_made_folders()
            raise _disk_error(parent, e) from e

    def park(self, state: Mapping[str, torch.Tensor]) -> SpilledState:
        """Write state one raw file per tensor (the caller's tensors are left as they are)."""
        sub, files, quantized = None, {}, {}
        try:
            sub = tempfile.mkdtemp(prefix="reply-", dir=self.path)
            for i, (k, t) in enumerate(state.items()):
                parts = {k: t}
                if isinstance(t, QTensor):  # an uploaded update: its data and scales, each a file
                    parts = {f"\0{k}:q": t.data, f"\0{k}:scale": t.scale}
                    quantized[k] = (*parts, t.bits, t.shape, t.group_size)
                for j, (key, part) in enumerate(parts.items()):
                    path = os.path.join(sub, f"{i}.{j}.bin")
                    with open(path, "wb") as f:
                        _write(f, part.detach())
                    files[key] = (path, part.dtype, part.shape)
        except OSError as e:
            if sub is not None:
                shutil.rmtree(sub, ignore_errors=True)
            raise _disk_error(sub or self.path, e) from e
        return SpilledState(files, quantized)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        """Remove the folders above self.path that this SpillDir created, where empty."""
        for p in self._made:
            try:
                os.rmdir(p)  # only if empty: another round's or run's folder stays
            except OSError:
                break
        self._made = []

    def __enter__(self) -> SpillDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
