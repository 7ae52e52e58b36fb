"""This process's memory, from /proc/self/status: its RSS, and its peak RSS per phase of a round.

Linux keeps one high-water mark per process (VmHWM); writing "5" to /proc/self/clear_refs resets it to the
current RSS. `PhasePeaks` reads and resets it at each phase boundary (after handing freed heap pages back,
`release_freed_memory`), so the server can log what each phase of a round (sending the slices, receiving
and merging the replies, evaluating) peaked at, and still report the process's overall peak. Where /proc
is missing (not Linux) the readings are None. The bench scripts read memory through these functions too.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """VmRSS / VmHWM (peak) of this process (or of `pid`) in bytes (None where there is none)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024


def memory_gb(field: str) -> float | None:
    """status_bytes in GB."""
    b = status_bytes(field)
    return None if b is None else b / 1e9


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Tensors under glibc's mmap
    threshold (up to 32 MB) live on the heap, and what a round frees there otherwise stays in the process's
    RSS; no-op elsewhere."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """mark(name) ends a phase: its peak RSS (GB) since the previous mark goes into `phases[name]`."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._overall = memory_gb("VmHWM") or 0.0
        self._resettable = reset_peak()

    def mark(self, name: str) -> None:
        peak = memory_gb("VmHWM")
        if peak is None:
            return
        self.phases[name] = peak
        self._overall = max(self._overall, peak)
        release_freed_memory()
        self._resettable = reset_peak()

    def overall(self) -> float | None:
        """The process's peak RSS since it started (the high-water marks of every phase, and of now)."""
        now = memory_gb("VmHWM")
        return None if now is None else max(self._overall, now)

    def line(self) -> str:
        """The last round's phases, for the log (bench/server_scaling.py reads it)."""
        what = ", ".join(f"{k} {v:.3f} GB" for k, v in self.phases.items())
        return what + ("" if self._resettable else " (cumulative: this system cannot reset the peak)")
