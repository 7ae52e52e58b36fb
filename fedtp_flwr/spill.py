"""Park client replies on disk while they wait to be merged.

Some replies cannot be merged on arrival (the outlier check needs three replies to judge the first two; the robust
median needs every reply of a rank group). Held in RAM, the server's memory would grow with the number of clients
(up to ~4.4 GB per reply at Llama 3.2 3B). SpillDir.park writes a reply one file per tensor, dropping each tensor from
the caller's dict as it is written, and the SpilledState it returns reads them back one tensor at a time (no cache, no
mmap), so at most one tensor of a parked reply is resident at once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import torch


def _disk_error(where: str, e: OSError) -> OSError:
    return OSError(f"cannot park client replies on disk under {where}: point spill-dir at a writable directory with "
                   f"free space, or free space there ({e})")


def _own_bytes(t: torch.Tensor) -> torch.Tensor:
    """t itself if its storage holds exactly its data, else a compact copy (torch.save writes the whole storage)."""
    t = t.detach()
    if (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class SpilledState(Mapping):
    """A parked reply: name -> tensor, in the original order; every read loads that one tensor from disk."""

    def __init__(self, files: dict[str, tuple[str, int]]):
        self._files = files  # name -> (path, bytes of tensor data)

    def __getitem__(self, k: str) -> torch.Tensor:
        return torch.load(self._files[k][0], map_location="cpu", weights_only=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def pop(self, k: str) -> torch.Tensor:
        """Load k, delete its file and forget it (WeightedFold.add(release=True) drains a reply this way)."""
        t = self[k]
        path, _ = self._files.pop(k)
        os.remove(path)
        return t

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data still parked."""
        return sum(n for _, n in self._files.values())


class SpillDir:
    """One round's parked replies, in a temporary directory under parent; close() removes it and all in it."""

    def __init__(self, parent: str | os.PathLike):
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix="fedtp-spill-", dir=parent)
        except OSError as e:
            raise _disk_error(os.fspath(parent), e) from e

    def park(self, state: dict[str, torch.Tensor], release: bool = True) -> SpilledState:
        """Write state one file per tensor; release=True pops each tensor from state once it is written."""
        sub, files = None, {}
        try:
            sub = tempfile.mkdtemp(prefix="reply-", dir=self.path)
            for i, k in enumerate(list(state)):
                t = _own_bytes(state[k])
                path = os.path.join(sub, f"{i}.pt")
                torch.save(t, path)
                files[k] = (path, t.numel() * t.element_size())
                del t
                if release:
                    del state[k]
        except OSError as e:
            if sub is not None:
                shutil.rmtree(sub, ignore_errors=True)
            raise _disk_error(sub or self.path, e) from e
        return SpilledState(files)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> SpillDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
