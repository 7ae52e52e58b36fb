"""fedtp_flwr.server.memory: each phase of a round gets its own peak RSS, and the process's overall peak is kept.

The logic is driven by scripted /proc readings (no assertion on the machine's real RSS, which another process
or the allocator can move); the reader itself is checked against this process's own /proc entry."""

from __future__ import annotations

import os

import pytest

from fedtp_flwr.server import memory


def test_each_phase_has_its_own_peak_and_the_overall_peak_is_kept(monkeypatch):
    # VmHWM as the kernel would report it (each mark resets it to the RSS of that moment): 1.0 GB at start,
    # 3.0 GB at the end of the first phase, 1.5 GB at the end of the second, 1.3 GB when overall() reads it
    readings = iter([1.0e9, 3.0e9, 1.5e9, 1.3e9])
    resets = []
    monkeypatch.setattr(memory, "status_bytes", lambda field, pid="self": next(readings))
    monkeypatch.setattr(memory, "reset_peak", lambda: resets.append(1) or True)
    phases = memory.PhasePeaks()
    phases.mark("sending")
    phases.mark("merging")
    assert phases.phases == {"sending": 3.0, "merging": 1.5} and len(resets) == 3  # start + each mark
    assert phases.overall() == 3.0  # the first phase's peak, though the mark reset it
    assert phases.line() == "sending 3.000 GB, merging 1.500 GB"


def test_without_proc_there_are_no_phases(monkeypatch):
    monkeypatch.setattr(memory, "status_bytes", lambda field, pid="self": None)
    monkeypatch.setattr(memory, "reset_peak", lambda: False)
    phases = memory.PhasePeaks()
    phases.mark("sending")
    assert phases.phases == {} and phases.overall() is None


def test_the_reader_parses_this_process_and_names_a_missing_one():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc here")
    rss = memory.status_bytes("VmRSS")
    assert isinstance(rss, int) and rss > 0 and rss % 1024 == 0  # kB in the file, bytes out
    assert memory.status_bytes("VmRSS", os.getpid()) is not None
    assert memory.status_bytes("VmRSS", 2 ** 30) is None  # no such process
    assert memory.status_bytes("NoSuchField") is None
