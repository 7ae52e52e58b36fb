"""The learning-quality benchmark's smoke mode: it runs end to end and writes the JSON docs/slice-modes.md reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_learning_quality_quick(tmp_path):
    out = tmp_path / "lq.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learning_quality.py"), "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "learning_quality" and doc["settings"]["quick"] is True
    assert (tmp_path / "cache").is_dir() and list((tmp_path / "cache").glob("pretrain-*/params.json"))
    assert doc["pretrain"]["ppl_after"] < doc["pretrain"]["ppl_before"]
    runs = {r["config"]: r for r in doc["runs"]}
    assert set(runs) == {"fedavg", "ctx8-ac-w2"}
    for r in runs.values():
        assert [h[0] for h in r["history"]] == [0, 1]  # round 0 = the pretrained model, then 1 round
        assert all(len(h) == 3 and h[2] > 1 for h in r["history"])
        assert r["final_ppl"] == r["history"][-1][2]
        assert abs(r["down_vs_analytic"] - 1) < 0.01 and abs(r["up_vs_analytic"] - 1) < 0.01
    assert runs["fedavg"]["bytes_down_per_client_round"] == runs["fedavg"]["bytes_up_per_client_round"]
    assert runs["ctx8-ac-w2"]["bytes_up_per_client_round"] < runs["ctx8-ac-w2"]["bytes_down_per_client_round"] \
        < runs["fedavg"]["bytes_down_per_client_round"]
    summary = {s["config"]: s for s in doc["summary"]}
    assert summary["fedavg"]["ratio_to_fedavg_mean"] == 1.0
    assert abs(summary["fedavg"]["down_frac_fp32"] - 1) < 0.001  # .npy headers: ~128 B per tensor
    assert 0.5 < summary["ctx8-ac-w2"]["down_frac_fp32"] < 1 and summary["ctx8-ac-w2"]["memory_frac_fedavg"] < 1
    assert {"trainable_params", "frozen_bytes", "activation_bytes", "total_bytes"} <= set(doc["memory"]["ctx8-ac-w2"])
    assert doc["memory"]["ctx8-ac-w2"]["frozen_bytes"] > 0 == doc["memory"]["fedavg"]["frozen_bytes"]
    assert {w["world_size"] for w in doc["wire"]["llama3.2-3b"]} == {1, 2, 4, 8}
