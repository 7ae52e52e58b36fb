"""bench/adapter_comparison.py: the merged federated LoRA's server step (the weighted mean of the clients'
products B A added to the base), the code corpus's splits, the summary's shares, and its smoke run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONTEXT_ARGS, random_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import adapter_comparison as ac  # noqa: E402
import method_comparison as mc  # noqa: E402


def test_products_are_b_times_a_for_every_adapted_linear():
    model = mc.lora_model(CONTEXT_ARGS, random_model().state_dict(), rank=3, seed=1)
    g = torch.Generator().manual_seed(0)  # fixed values: the test is the same on every run
    for p in model.parameters():
        if p.requires_grad:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randint(0, CONTEXT_ARGS.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    base = random_model()
    state = base.state_dict()
    for name, product in ac._lora_scale_products(mc.adapter_state(model)).items():
        state[name] = state[name] + product  # lora_alpha = rank: the adapter adds exactly B A
    base.load_state_dict(state)
    torch.testing.assert_close(base(x), model(x), rtol=1e-4, atol=1e-4)  # float32 sums in another order


def test_held_out_files_alternate_between_validation_and_test(tmp_path):
    ac._alternate(tmp_path / "v.jsonl", tmp_path / "t.jsonl", ["a", "b", "c", "d", "e"])
    read = [[json.loads(l)["text"] for l in (tmp_path / f).read_text().splitlines()] for f in ("v.jsonl", "t.jsonl")]
    assert read == [["a", "c", "e"], ["b", "d"]]
    chunks = ac._chunks("x = 1\n" * 1000)
    assert "".join(chunks) == "x = 1\n" * 1000 and all(len(c) <= ac.CHUNK_CHARS + 6 for c in chunks)


def test_share_at_budget_reads_the_other_curve_at_the_same_client_seconds_or_bytes():
    # curves: rounds 0..3, shares of FedAvg's gain at its last round
    s = {"ctx": {"client_seconds_per_round": 2.0, "rounds": 3},
         "lora": {"client_seconds_per_round": 4.0, "rounds": 3,
                  "val_gain_of_fedavg_final_per_round": [{"mean": 0.0}, {"mean": 0.5}, {"mean": 0.8}, {"mean": 0.9}]}}
    assert ac._share_at_budget(s, "lora", "ctx", "client_seconds_per_round") == pytest.approx(0.65)  # 1.5 rounds
    s["lora"]["client_seconds_per_round"] = 1.0  # 6 rounds: beyond its 3
    assert ac._share_at_budget(s, "lora", "ctx", "client_seconds_per_round") is None
    s["ctx"]["mb_per_round"], s["lora"]["mb_per_round"] = 1.0, 6.0  # ctx's 3 MB: half a round of lora, from 0
    assert ac._share_at_budget(s, "lora", "ctx", "mb_per_round") == pytest.approx(0.25)


def test_fedavg_at_a_smaller_byte_budget_is_below_its_final_gain():
    # FedAvg's loss 4 -> 2 -> 1.5 -> 1 (start 4): its curve of its own last-round gain is 0, 2/3, 5/6, 1; the codec
    # spends FedAvg's bytes of 1.5 rounds, where FedAvg had 3/4 of its final gain, not 1 (the old per-round bug)
    fed = {"corpus": "code", "seed": 1, "method": "fedavg", "history": [[0, 4.0], [1, 2.0], [2, 1.5], [3, 1.0]],
           "bytes_down_per_client_round": 3e6, "bytes_up_per_client_round": 3e6, "client_seconds": [1.0],
           "scores_best": {"test": 1.0}, "scores_last": {"test": 1.0}, "best_round": 3}
    codec = {**fed, "method": "ctx-ad-w2-up4-down4", "history": [[0, 4.0], [1, 2.5], [2, 1.8], [3, 1.2]],
             "bytes_down_per_client_round": 1e6, "bytes_up_per_client_round": 2e6}
    doc = {"runs": [fed, codec], "corpora": {"code": {"start_scores": {"test": 4.0}, "memory": {}, "model": "m"}}}
    ac.summarize(doc)
    s = doc["summary"]["code"]
    assert [p["mean"] for p in s["fedavg"]["val_gain_of_fedavg_final_per_round"]] == pytest.approx([0, 2 / 3, 5 / 6, 1])
    assert ac._share_at_budget(s, "fedavg", "ctx-ad-w2-up4-down4", "mb_per_round") == pytest.approx(0.75)
    target = doc["targets"]["code"]["ctx-ad-w2-up4-down4 >= fedavg at equal total bytes"]
    assert target["fedavg_at_codec_bytes"] == pytest.approx(0.75) and target["codec"] == pytest.approx(2.8 / 3)


@pytest.mark.slow
def test_quick_run_writes_every_kind_of_method_and_the_targets(tmp_path):
    out = tmp_path / "ac.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "adapter_comparison.py"), "--quick", "--corpora", "code",
                           "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    runs = {r["method"]: r for r in doc["runs"]}
    assert set(runs) == {"fedavg", "ctx-ad-w2", "lora-merged-w2mem"}
    for r in runs.values():
        assert [h[0] for h in r["history"]] == list(range(r["rounds"] + 1))
        assert set(r["scores_best"]) == {"test", "forget"} and 1 <= r["best_round"] <= r["rounds"]
    assert runs["ctx-ad-w2"]["rest-adapter-rank"] == 2  # the quick run's rank reached the server's config
    s = doc["summary"]["code"]
    assert s["fedavg"]["val_loss_share_at_rounds"]["mean"] == pytest.approx(1.0)
    assert "forgetting_best_round" in s["ctx-ad-w2"]
    assert set(doc["targets"]["code"]) >= {"ctx-ad-w2 >= 95% of FedAvg's gain at equal rounds"}
    assert (tmp_path / "ac.md").read_text().startswith("# Rest adapters vs FedAvg")


def test_nodes_per_group_splits_each_group_into_alternate_lines(tmp_path):
    """--nodes-per-group 2 (8 nodes, so that W = 8 has a node per rank): each group's records go alternately to its
    two nodes, none lost or repeated."""
    files = []
    for g in ("a", "b"):
        f = tmp_path / f"node-{g}.jsonl"
        f.write_text("".join(json.dumps({"text": f"{g}{i}"}) + "\n" for i in range(5)))
        files.append(f)
    split = ac.split_nodes(files, 2, tmp_path / "x2")
    read = [[json.loads(l)["text"] for l in p.read_text().splitlines()] for p in split]
    assert read == [["a0", "a2", "a4"], ["a1", "a3"], ["b0", "b2", "b4"], ["b1", "b3"]]
    assert ac.split_nodes(files, 1, tmp_path / "x1") == files
