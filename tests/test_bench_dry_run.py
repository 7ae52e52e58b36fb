"""The bench scripts run end to end in their small modes and write the JSON the README quotes.

Each script runs as a subprocess exactly as a user runs it (`python bench/<name>.py ...`), writing into a
temporary file instead of bench/results/. Together ~30 s on 2 CPU cores. bench/transport.py (a Flower
deployment moving 1 GB) and the full modes are not run here; see bench/README.md.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert {"benchmark", "command", "date", "machine"} <= set(doc)
    return doc


def test_gpu_step_dry_run_runs_the_gpu_code_path_on_the_cpu(tmp_path):
    doc = run_bench("gpu_step.py", "--dry-run", "--world-sizes", "2,1", out=tmp_path / "gpu.json")
    assert doc["dry_run"] is True and doc["device"] == "cpu" and doc["model"] == "llama3.2-tiny"
    assert [r["world_size"] for r in doc["rows"]] == [2, 1] and not doc["skipped"]
    for r in doc["rows"]:
        assert {"tokens_per_second", "step_seconds", "peak_memory_allocated", "analytic_peak", "mfu",
                "achieved_tflops", "model_flops_per_token", "params", "step_time_vs_full"} <= set(r)
        assert r["tokens_per_second"] > 0 and r["peak_memory_allocated"] > 0 and r["loss_finite"]
    slice_, full = doc["rows"]
    assert slice_["params"] < full["params"] and slice_["model_flops_per_token"] < full["model_flops_per_token"]


def test_gpu_step_refuses_to_run_without_cuda_unless_dry_run(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_step.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode != 0 and "--dry-run" in proc.stderr


def test_communication_shape_class_count_equals_whole_message_serialization(tmp_path):
    doc = run_bench("communication.py", "--quick", out=tmp_path / "comm.json")
    assert doc["checks"] and doc["rows"]
    for c in doc["checks"]:
        assert c["shape_class_minus_full"] == 0, c  # the method used for the 3B table is exact
        assert c["full_wire"] > c["full_objects"] > c["full_payload"] > c["analytic"]
    assert {r["world_size"] for r in doc["rows"]} == {1, 2, 4}
    assert {"max_wire_over_analytic", "aim_met"} <= set(doc["summary"])


def test_train_throughput_quick(tmp_path):
    doc = run_bench("train_throughput.py", "--quick", out=tmp_path / "tput.json")
    assert [r["world_size"] for r in doc["rows"]] == [1, 2, 4]
    for r in doc["rows"]:
        assert r["tokens_per_second"] > 0 and 0 < r["flops_ratio_vs_full"] <= 1
    assert "w2_time_ratio" in doc["summary"]


def test_client_memory_quick(tmp_path):
    doc = run_bench("client_memory.py", "--quick", out=tmp_path / "mem.json")
    assert [r["world_size"] for r in doc["rows"]] == [1, 2]
    for r in doc["rows"]:
        assert r["measured"] > 0 and r["analytic"]["peak"] >= r["analytic"]["static"] > 0
    assert [t["world_size"] for t in doc["llama3.2-3b"]] == [1, 2, 4, 8]
    assert "max_abs_deviation_slices" in doc["summary"]


def test_server_merge_quick(tmp_path):
    doc = run_bench("server_merge.py", "--quick", out=tmp_path / "merge.json")
    assert {r["op"] for r in doc["rows"]} == {"copy", "merge", "aggregate"}
    for r in doc["rows"]:
        assert r["seconds"] > 0 and r["out_bytes"] == r["model_bytes"] and not r["extrapolated"]
    assert {"time_aim_met", "memory_aim_met"} <= set(doc["summary"])
