"""fedtp_flwr.server.memory: each phase of a round gets its own peak RSS, and the process's overall peak is kept."""

from __future__ import annotations

import pytest
import torch

from fedtp_flwr.server import memory


def test_each_phase_has_its_own_peak_and_the_overall_peak_is_kept():
    if memory.status_bytes("VmHWM") is None or not memory.reset_peak():
        pytest.skip("no /proc/self/status or clear_refs here")
    phases = memory.PhasePeaks()
    big = torch.ones(50_000_000)  # 200 MB, every page written
    del big
    phases.mark("big")
    phases.mark("small")  # nothing allocated since the last mark
    assert phases.phases["big"] - phases.phases["small"] > 0.15  # GB: the 200 MB are in the first phase only
    assert phases.overall() >= phases.phases["big"]
    assert phases.line() == f"big {phases.phases['big']:.3f} GB, small {phases.phases['small']:.3f} GB"


def test_another_process_is_read_by_pid():
    import os

    assert memory.status_bytes("VmRSS", os.getpid()) == pytest.approx(memory.status_bytes("VmRSS"), rel=0.05)
    assert memory.status_bytes("VmRSS", 2 ** 30) is None  # no such process
