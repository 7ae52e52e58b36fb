"""bench/method_comparison.py: its LoRA baseline (peft adapters, Flower's FedAvg), its equal-budget reading of
the curves, and its smoke run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONTEXT_ARGS, random_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import method_comparison as mc  # noqa: E402


def test_interp_reads_a_curve_between_its_points_and_refuses_beyond_it():
    xs, ys = [0.0, 10.0, 20.0], [8.0, 6.0, 5.0]
    assert mc._interp(xs, ys, 5.0) == pytest.approx(7.0)
    assert mc._interp(xs, ys, 20.0) == 5.0 and mc._interp(xs, ys, 0.0) == 8.0
    assert mc._interp(xs, ys, 20.5) is None  # a budget the run did not reach is missing, not extrapolated


def test_lora_model_trains_only_the_adapters_and_starts_as_the_base_model():
    state = random_model().state_dict()
    model = mc.lora_model(CONTEXT_ARGS, state, rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(mc.LORA_TARGETS)  # every linear of every block
    base = random_model()
    x = torch.randint(0, CONTEXT_ARGS.vocab_size, (2, 16))
    torch.testing.assert_close(model(x), base(x))  # B = 0 at init: the adapters change nothing yet
    adapters = mc.adapter_state(model)
    assert sum(t.numel() for t in adapters.values()) == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def test_adapters_round_trip_through_the_wire_and_a_wrong_rank_is_refused():
    state = random_model().state_dict()
    a, b = mc.lora_model(CONTEXT_ARGS, state, 4, seed=1), mc.lora_model(CONTEXT_ARGS, state, 4, seed=2)
    for p in a.parameters():
        if p.requires_grad:
            p.data.normal_()
    mc.load_adapters(b, mc.encode(mc.adapter_state(a)))
    for k, v in mc.adapter_state(a).items():
        assert torch.equal(mc.adapter_state(b)[k], v)
    with pytest.raises(ValueError, match="adapter arrays differ"):
        mc.load_adapters(mc.lora_model(CONTEXT_ARGS, state, 8), mc.encode(mc.adapter_state(a)))


def test_matched_rank_is_the_rank_whose_memory_is_closest_to_the_target():
    state = random_model().state_dict()
    mem = {r: mc.lora_memory(CONTEXT_ARGS, state, r, 2, 16)["total_bytes"] for r in (3, 4, 5)}
    assert mem[3] < mem[4] < mem[5]
    assert mc.matched_rank(CONTEXT_ARGS, state, mem[4] + 1, 2, 16) == 4
    assert mc.matched_rank(CONTEXT_ARGS, state, 0, 2, 16) == 1


@pytest.mark.slow
def test_method_comparison_quick_runs_every_kind_of_method_and_writes_the_summary(tmp_path):
    out = tmp_path / "mc.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "method_comparison.py"), "--quick", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "method_comparison" and doc["settings"]["quick"] is True
    runs = {(r["corpus"], r["method"]): r for r in doc["runs"]}
    assert set(runs) == {("plays", "fedavg"), ("plays", "ctx-w2"), ("plays", "lora-w2mem"),
                         ("pydocs", "fedavg"), ("pydocs", "lora-w2mem")}
    for (corpus, method), r in runs.items():
        assert [h[0] for h in r["history"]] == list(range(r["rounds"] + 1))
        assert r["history"][0][2] == runs[(corpus, "fedavg")]["history"][0][2]  # one pretrained start per corpus
    lora = runs[("plays", "lora-w2mem")]
    c = doc["corpora"]["plays"]
    assert lora["rank"] == c["ranks"]["lora-w2mem"] >= 1
    assert lora["bytes_up_per_client_round"] < runs[("plays", "fedavg")]["bytes_up_per_client_round"]
    assert lora["bytes_once"] == 4 * c["params"]  # the float32 base, downloaded once
    # the rank's memory is the closest to the context client's it is compared with
    assert abs(c["memory"]["lora-w2mem"]["total_bytes"] / c["memory"]["ctx-w2"]["total_bytes"] - 1) < 0.05
    assert set(c["step_seconds"]) >= {"fedavg", "ctx-w2", "lora-w2mem"}
    s = doc["summary"]["plays"]
    assert s["fedavg"]["gain_share_mean"] == pytest.approx(1.0)
    assert s["ctx-w2"]["equal_bytes_ctx-w2"]["share_mean"] == pytest.approx(s["ctx-w2"]["gain_share_mean"])
    # no machine paths in the results (the command lines and the settings name the test's own folders)
    assert str(tmp_path) not in json.dumps({k: v for k, v in doc.items() if k not in ("command", "invocations", "settings")})
    assert set(doc["targets"]["plays"]) >= {"ctx-w2 >= FedAvg's gain at equal bytes"}
