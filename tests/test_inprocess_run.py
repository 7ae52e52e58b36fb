"""The whole server logic (server.run) with the client logic, in-process: outputs, resume, faults."""

import math
import pickle

import pytest
import torch

from fedtp_flwr.config import STRATEGIES, ConfigError, RunConfig
from fedtp_flwr.server.app import run
from fedtp_flwr.server.outputs import load_run_checkpoint
from fedtp_flwr.server.strategy import RunFailed
from fedtp_flwr.testing.inprocess import InProcessGrid, handle

BASE = {"num-server-rounds": 2, "world-size": 2, "local-steps": 2, "batch-size": 2, "max-seq-len": 32,
        "eval-batches": 2, "max-batch-size": 4, "learning-rate": 1e-3}


def nodes(n):
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def go(tmp_path, n_nodes=2, handler=handle, **overrides):
    cfg = {**BASE, "output-dir": str(tmp_path), **overrides}
    grid = InProcessGrid(nodes(n_nodes), cfg, handler=handler)
    run(grid, cfg)
    return grid


@pytest.mark.slow  # full in-process rounds of the tiny preset: seconds each
def test_outputs_in_the_seed_formats_and_perplexity_falls(tmp_path):
    grid = go(tmp_path)
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    key = (2, 1e-3, False, 2, 42)
    assert list(results) == [key]
    rounds = [r for r, _, _ in results[key]]
    assert rounds == [0, 1, 2]
    assert results[key][-1][2] < results[key][0][2]
    lines = (tmp_path / "eval_res_llama32_ws2_r2.txt").read_text().splitlines()
    assert lines[0].startswith("Round: 0, Loss: ") and ", Perplexity: " in lines[0] and len(lines) == 3
    ckpt = load_run_checkpoint(tmp_path / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")
    assert ckpt["round"] == 2 and ckpt["experiment_key"] == key and ckpt["config"]["world-size"] == 2
    full = sum(t.numel() for t in ckpt["model_state_dict"].values())
    for msg in grid.delivered:  # every node got a slice, never the full model
        sent = sum(math.prod(a.shape) for a in msg.content["arrays"].values())
        assert sent < full
    # a second run into the same folder adds its key to the results file and keeps the first one's
    go(tmp_path, **{"num-server-rounds": 1, "seed": 7})
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    assert set(results) == {key, (2, 1e-3, False, 1, 7)}


@pytest.mark.slow
def test_resume_continues_bit_identical_and_refuses_a_change_of_the_math(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    go(a, **{"num-server-rounds": 2})
    # "stop" after round 1: resume from its checkpoint and run round 2 only
    ckpt = str(a / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth")
    go(b, **{"num-server-rounds": 2, "resume-from": ckpt})
    sa = load_run_checkpoint(a / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")["model_state_dict"]
    sb = load_run_checkpoint(b / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")["model_state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not (b / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth").exists()  # round 1 was not rerun
    lines = (b / "eval_res_llama32_ws2_r2.txt").read_text().splitlines()
    assert [l.split(",")[0] for l in lines] == ["Round: 0", "Round: 1", "Round: 2"]
    # a key that changes the merge, or another world size, is refused before anything runs; others may change
    with pytest.raises(ConfigError, match="rank-merge"):
        go(tmp_path / "c", **{"num-server-rounds": 2, "rank-merge": "median", "resume-from": ckpt})
    with pytest.raises(ConfigError, match="world-size"):
        go(tmp_path / "d", **{"num-server-rounds": 2, "world-size": 4, "resume-from": ckpt})
    go(tmp_path / "e", **{"num-server-rounds": 2, "round-timeout": 60.0, "resume-from": ckpt})


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resumed_server_optimizer_run_with_sampling_equals_an_uninterrupted_one(tmp_path, strategy):
    """Every strategy of the config's own list, at its defaults: its rule's state (FedOpt's moments, FedAvgM's and
    DiLoCo's momentum; none for FedAvg and FedProx) and the `random` state Flower samples nodes with are in the
    checkpoint: resuming after round 1 gives round 2 bit for bit (half the nodes sampled each round)."""
    opts = {"num-server-rounds": 2, "strategy": strategy, "fraction-train": 0.5}
    a, b = tmp_path / "a", tmp_path / "b"
    go(a, n_nodes=4, **opts)
    go(b, n_nodes=4, **opts, **{"resume-from": str(a / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth")})
    ca = load_run_checkpoint(a / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")
    cb = load_run_checkpoint(b / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")
    has_server_step = RunConfig(strategy=strategy).effective_server_learning_rate is not None
    assert bool(ca["strategy_state"]) == has_server_step and "random_state" in ca
    assert all(torch.equal(ca["model_state_dict"][k], cb["model_state_dict"][k]) for k in ca["model_state_dict"])


@pytest.mark.slow
def test_a_failing_client_does_not_stop_the_run(tmp_path, caplog):
    def flaky(msg, cfg, node_config):
        if node_config["partition-id"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return handle(msg, cfg, node_config)

    go(tmp_path, handler=flaky)
    assert "dropping reply from node 2" in caplog.text and "simulated" in caplog.text
    assert "no valid reply for rank(s) [1]" in caplog.text
    assert (tmp_path / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth").exists()


def _broken(msg, cfg, node_config):
    raise RuntimeError("disk full (simulated)")


def test_a_round_without_valid_replies_fails_the_run_and_writes_no_checkpoint(tmp_path, caplog):
    with pytest.raises(RunFailed, match=r"round 1: 0 valid replies, fewer than min-train-nodes=1: the run stops"):
        go(tmp_path, handler=_broken, **{"num-server-rounds": 2})
    assert "disk full (simulated)" in caplog.text  # the clients' own errors are in the log
    assert "fedtp-flwr: 0 of 1 round trained (1: 0 clients (skipped))" in caplog.text
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    assert [r for r, _, _ in results[(2, 1e-3, False, 2, 42)]] == [0]  # round 0 only: nothing trained
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_allow_failed_rounds_skips_the_round_and_keeps_the_model(tmp_path, caplog):
    go(tmp_path, handler=_broken, **{"num-server-rounds": 1, "allow-failed-rounds": True})
    assert "round skipped" in caplog.text and "fedtp-flwr: 0 of 1 round trained" in caplog.text
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    (_, l0, _), (_, l1, _) = results[(2, 1e-3, False, 1, 42)]
    assert l0 == l1  # global model unchanged
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("key,value,match", [
    ("world-size", 3, "valid world sizes"),
    ("learning-rate", -1.0, "learning-rate"),
    ("strategy", "fedsgd", "strategy"),
    ("model", "llama9", "model"),
])
def test_invalid_config_names_the_key(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        go(tmp_path, **{key: value})


@pytest.mark.slow
@pytest.mark.parametrize("bits", [16, 4])
def test_context_mode_sends_the_frozen_rest_and_uploads_only_the_slice(tmp_path, bits):
    grid = go(tmp_path, **{"num-server-rounds": 1, "slice-mode": "context", "context-bits": bits})
    msg = grid.delivered[0]
    assert "context" in msg.content and msg.content["config"]["slice-mode"] == "context"
    assert all(k.endswith((":q", ":scale")) for k in msg.content["context"])
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    (_, _, p0), (_, _, p1) = results[(2, 1e-3, False, 1, 42)]
    assert p1 < p0


@pytest.mark.slow
def test_client_side_slice_evaluation(tmp_path, caplog):
    go(tmp_path, **{"num-server-rounds": 1, "client-eval": True})
    assert "slice evaluation (clients)" in caplog.text and "slice-perplexity" in caplog.text


@pytest.mark.slow
def test_recipe_options_run_end_to_end(tmp_path):
    """The options of configs/llama32-3b-small-gpu-*.toml through server.run: vocabulary-parallel context
    slices (the 128k-vocabulary preset, so the split rows are real), bf16 weights with torchao's
    stochastic-rounding AdamW, the step in backward, a chunked loss, the update up and the slice down in int4;
    with the slow-link recipe's DiLoCo outer step on the merge (configs/llama32-3b-slow-link-w2.toml: the same
    options plus that step, whose math against FedAvg's tests/test_outer.py checks). Replies carry the vocabulary
    slice's update (low-bit) and the rest adapters' factors."""
    from fedtp_flwr.config import AUTO_REST_ADAPTER_RANK
    from fedtp_flwr.model import preset_args
    from fedtp_flwr.model.context import adapter_shapes
    from fedtp_flwr.model.sharding import slice_shapes

    grid = go(tmp_path, **{"num-server-rounds": 1, "slice-mode": "context", "context-bits": 4, "vocab-parallel": True,
                           "client-param-dtype": "bfloat16", "optimizer-in-backward": True, "max-grad-norm": 0.0,
                           "loss-chunk-tokens": 16, "context-group-size": 128,
                           "upload-codec": "int4-delta", "download-codec": "int4",
                           "strategy": "diloco", "server-learning-rate": 1.0, "server-momentum": 0.5})
    assert grid.delivered[0].content["config"]["vocab-parallel"] is True
    assert not any(m.has_error() for m in grid.replies)
    shapes = slice_shapes(preset_args("llama3.2-tiny"), 2, vocab_parallel=True)
    assert shapes["output.weight"] == (128256 // 2, 128)
    # and the rest adapters context mode gets by default (on the blocks' linears, not the vocabulary rows)
    adapters = adapter_shapes(preset_args("llama3.2-tiny"), 2, AUTO_REST_ADAPTER_RANK, vocab_parallel=True)
    assert adapters and not any(k.startswith(("output", "tok_embeddings")) for k in adapters)
    for reply in grid.replies:
        assert {k: tuple(a.shape) for k, a in reply.content["arrays"].items()} == adapters
        assert set(reply.content["delta"]) == {f"{k}:{part}" for k in shapes for part in ("q", "scale")}
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    (_, _, p0), (_, _, p1) = results[(2, 1e-3, False, 1, 42)]
    assert p1 < p0


def n_slice(msg) -> int:
    """Values of the slice a message carries (from the server's config: the shapes its rank has)."""
    from fedtp_flwr.client.app import SliceJob
    from fedtp_flwr.model.sharding import slice_shapes

    job = SliceJob.from_config(msg.content["config"])
    return sum(math.prod(s) for s in slice_shapes(job.args, job.world_size, job.vocab_parallel).values())


def test_output_folders_by_run_id_and_by_resumed_checkpoint(tmp_path, monkeypatch):
    from fedtp_flwr.config import RunConfig
    from fedtp_flwr.server.app import resolve_output_dirs

    monkeypatch.chdir(tmp_path)
    assert resolve_output_dirs(RunConfig(), 7) == (tmp_path / "outputs" / "run-7", tmp_path / "outputs")
    named = RunConfig(output_dir=str(tmp_path / "mine"))
    assert resolve_output_dirs(named, 7) == (tmp_path / "mine", tmp_path / "mine")
    resumed = RunConfig(resume_from=str(tmp_path / "outputs" / "run-7" / "checkpoints" / "x_round1.pth"))
    assert resolve_output_dirs(resumed, 9) == (tmp_path / "outputs" / "run-7", tmp_path / "outputs")
    out, _ = resolve_output_dirs(RunConfig(), None)  # outside Flower: the UTC time names the folder
    assert out.parent == tmp_path / "outputs" and out.name.startswith("run-20")


@pytest.mark.slow
def test_two_runs_with_the_same_settings_keep_their_own_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {**BASE, "num-server-rounds": 1, "output-dir": ""}
    for run_id in (11, 12):
        run(InProcessGrid(nodes(2), cfg), cfg, run_id=run_id)
    for run_id in (11, 12):
        folder = tmp_path / "outputs" / f"run-{run_id}"
        assert (folder / "eval_res_llama32_ws2_r1.txt").is_file()
        assert (folder / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth").is_file()
    results = pickle.loads((tmp_path / "outputs" / "experiment_results_llama32.pkl").read_bytes())
    assert list(results) == [(2, 1e-3, False, 1, 42)]  # one key, merged as before (the later run's history)


@pytest.mark.slow
@pytest.mark.parametrize("download", ["wire", "int8"])
def test_int4_delta_uploads_train_with_a_seventh_of_the_bytes(tmp_path, caplog, download):
    """Three nodes (the outlier check parks the first replies: the updates are parked and read back too), each
    uploading its update in int4: the run trains, and a reply's slice bytes are 0.53125 / 4 = 0.133 of float32 weights
    (half a byte per value + a float32 scale per 128 values: wire.DELTA_GROUP)."""
    from fedtp_flwr.wire import record_nbytes

    grid = go(tmp_path, n_nodes=3, **{"num-server-rounds": 1, "upload-codec": "int4-delta", "rest-adapter-rank": 0,
                                      "min-available-nodes": 3, "download-codec": download})
    assert not any(m.has_error() for m in grid.replies) and "round 1: 3 valid replies" in caplog.text
    for reply, sent in zip(grid.replies, grid.delivered):
        assert set(reply.content) == {"arrays", "delta", "metrics"} and not reply.content["arrays"]
        ratio = record_nbytes(reply.content["delta"]) / (4 * n_slice(sent))  # against float32 weights
        assert 0.132 < ratio < 0.135, ratio
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    (_, l0, _), (_, l1, _) = results[(2, 1e-3, False, 1, 42)]
    assert l1 < l0
