"""The whole server logic (server.run) with the client logic, in-process: outputs, resume, faults."""

import json
import math
import pickle

import pytest
import torch

from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.server.app import run
from fedtp_flwr.server.outputs import load_run_checkpoint, read_results
from fedtp_flwr.server.strategy import RunFailed
from fedtp_flwr.testing.inprocess import InProcessGrid, handle

BASE = {"num-server-rounds": 2, "world-size": 2, "local-steps": 2, "batch-size": 2, "max-seq-len": 32,
        "eval-batches": 2, "max-batch-size": 4, "learning-rate": 1e-3}


def nodes(n):
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def go(tmp_path, n_nodes=2, handler=handle, run_id=1, node_ids=None, **overrides):
    """A run into tmp_path/run-<run_id> (tmp_path is output-dir: it holds the merged results file)."""
    cfg = {**BASE, "output-dir": str(tmp_path), **overrides}
    grid = InProcessGrid(nodes(n_nodes), cfg, handler=handler, node_ids=node_ids)
    run(grid, cfg, run_id=run_id)
    return grid


@pytest.mark.slow  # full in-process rounds of the tiny preset: seconds each
def test_outputs_in_the_seed_formats_and_perplexity_falls(tmp_path, caplog):
    grid = go(tmp_path)
    # the ServerApp's last line says what the run trained
    assert caplog.records[-1].getMessage() == "fedtp-flwr: 2 of 2 rounds trained (1: 2 clients, 2: 2 clients)"
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    key = (2, 1e-3, False, 2, 42)
    assert list(results) == [key]
    rounds = [r for r, _, _ in results[key]]
    assert rounds == [0, 1, 2]
    assert results[key][-1][2] < results[key][0][2]
    lines = (tmp_path / "run-1" / "eval_res_llama32_ws2_r2.txt").read_text().splitlines()
    assert lines[0].startswith("Round: 0, Loss: ") and ", Perplexity: " in lines[0] and len(lines) == 3
    ckpt = load_run_checkpoint(tmp_path / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")
    assert ckpt["round"] == 2 and ckpt["experiment_key"] == key and ckpt["config"]["world-size"] == 2
    full = sum(t.numel() for t in ckpt["model_state_dict"].values())
    for msg in grid.delivered:  # every node got a slice, never the full model
        sent = sum(math.prod(a.shape) for a in msg.content["arrays"].values())
        assert sent < full
    # a second run into the same folder adds its key to the results file and keeps the first one's
    go(tmp_path, **{"num-server-rounds": 1, "seed": 7})
    results = pickle.loads((tmp_path / "experiment_results_llama32.pkl").read_bytes())
    assert set(results) == {key, (2, 1e-3, False, 1, 7)}


def _files(folder):
    """Every file under `folder` with its bytes (links followed)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_is_the_uninterrupted_run_and_writes_only_its_own_folder(tmp_path):
    """Flower's simulation draws new random node ids in every run: here the resumed run's ids sort the other way
    round. Ranks follow the identity each node states (its partition id), so resuming after round 1 gives rounds 2
    and 3 bit for bit, into a new folder: the run it continues is not touched."""
    ckpt_name = "llama32_tiny_ws2_lr0.001_round{}.pth"
    go(tmp_path, node_ids=[900, 17], run_id=1, **{"num-server-rounds": 3})
    first = tmp_path / "run-1"
    before = _files(first)
    ckpt = first / "checkpoints" / ckpt_name.format(1)
    go(tmp_path, node_ids=[5, 800], run_id=2, **{"num-server-rounds": 3, "resume-from": str(ckpt)})
    assert _files(first) == before  # the resumed-from run's folder is not written
    resumed = tmp_path / "run-2"
    for r in (2, 3):
        sa = load_run_checkpoint(first / "checkpoints" / ckpt_name.format(r))["model_state_dict"]
        sb = load_run_checkpoint(resumed / "checkpoints" / ckpt_name.format(r))["model_state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), r
    assert (resumed / "eval_res_llama32_ws2_r3.txt").read_text() == (first / "eval_res_llama32_ws2_r3.txt").read_text()
    assert (resumed / "checkpoints" / ckpt_name.format(1)).samefile(ckpt)  # linked, not rerun
    record = json.loads((resumed / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed-from"] == str(ckpt.resolve())
    key = (2, 1e-3, False, 3, 42)
    merged = read_results(tmp_path / "experiment_results_llama32.pkl")
    assert merged[key] == read_results(first / "experiment_results_llama32.pkl")[key]  # the first run's, kept
    assert read_results(resumed / "experiment_results_llama32.pkl")[key] == merged[key]  # equal: the same run


@pytest.mark.slow
def test_resume_refuses_a_change_of_the_math_and_a_finished_checkpoint(tmp_path):
    go(tmp_path, **{"num-server-rounds": 1})
    ckpt = str(tmp_path / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth")
    # a key that changes the merge, or another world size, is refused before anything runs; others may change
    with pytest.raises(ConfigError, match="rank-merge"):
        go(tmp_path / "c", **{"num-server-rounds": 2, "rank-merge": "median", "resume-from": ckpt})
    with pytest.raises(ConfigError, match="world-size"):
        go(tmp_path / "d", **{"num-server-rounds": 2, "world-size": 4, "resume-from": ckpt})
    with pytest.raises(ConfigError, match="leaves no round to train"):
        go(tmp_path / "f", **{"num-server-rounds": 1, "resume-from": ckpt})
    go(tmp_path / "e", **{"num-server-rounds": 2, "round-timeout": 60.0, "resume-from": ckpt})


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedadam"])
def test_resumed_server_optimizer_run_with_sampling_equals_an_uninterrupted_one(tmp_path, strategy):
    """A rule's state (FedAdam's moments) and the `random` state Flower samples nodes with are in the checkpoint:
    resuming after round 1 gives round 2 bit for bit with half the nodes sampled each round, under other node ids.
    (Every strategy's own state: tests/test_strategy_defaults.py.)"""
    opts = {"num-server-rounds": 2, "strategy": strategy, "fraction-train": 0.5}
    a, b = tmp_path / "a", tmp_path / "b"
    go(a, n_nodes=4, **opts)
    go(b, n_nodes=4, node_ids=[40, 30, 20, 10], **opts,
       **{"resume-from": str(a / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth")})
    ca = load_run_checkpoint(a / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")
    cb = load_run_checkpoint(b / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth")
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
    assert (tmp_path / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round2.pth").exists()


def _broken(msg, cfg, node_config):
    raise RuntimeError("disk full (simulated)")


def test_a_round_without_valid_replies_fails_the_run_and_writes_no_checkpoint(tmp_path, caplog):
    with pytest.raises(RunFailed, match=r"round 1: 0 valid replies, fewer than min-train-nodes=1: the run stops"):
        go(tmp_path, handler=_broken, **{"num-server-rounds": 2})
    assert "disk full (simulated)" in caplog.text  # the clients' own errors are in the log
    assert caplog.records[-1].getMessage() == "fedtp-flwr: 0 of 1 round trained (1: 0 clients (skipped))"
    folder = tmp_path / "run-1"
    results = read_results(folder / "experiment_results_llama32.pkl")
    assert [r for r, _, _ in results[(2, 1e-3, False, 2, 42)]] == [0]  # round 0 only: nothing trained
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())
    assert not (tmp_path / "experiment_results_llama32.pkl").exists()  # a failed run never enters the merged file
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "failed" and "0 valid replies" in record["reason"]


def test_allow_failed_rounds_skips_the_round_but_a_run_that_trained_nothing_fails(tmp_path, caplog):
    with pytest.raises(RunFailed, match="no round trained"):
        go(tmp_path, handler=_broken, **{"num-server-rounds": 1, "allow-failed-rounds": True})
    assert "round skipped, global model kept (allow-failed-rounds)" in caplog.text
    assert "fedtp-flwr: 0 of 1 round trained" in caplog.text
    results = read_results(tmp_path / "run-1" / "experiment_results_llama32.pkl")
    (_, l0, _), (_, l1, _) = results[(2, 1e-3, False, 1, 42)]
    assert l0 == l1  # global model unchanged
    assert not (tmp_path / "run-1" / "checkpoints").exists() or not any((tmp_path / "run-1" / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_run_whose_every_merge_is_refused_fails_and_writes_no_checkpoint(tmp_path, caplog):
    """A user's finding: FedAdam at too large a step, every merged model refused by the loss guard; the run said
    "completed" and wrote round checkpoints of the untrained model (and a _best naming one). eta 100 here: every
    merge is refused whatever the platform's rounding."""
    with pytest.raises(RunFailed, match="no round trained"):
        go(tmp_path, **{"num-server-rounds": 2, "strategy": "fedadam", "server-learning-rate": 100.0})
    assert "fedtp-flwr: 0 of 2 rounds trained (1: 2 clients (refused), 2: 2 clients (refused))" in caplog.text
    folder = tmp_path / "run-1"
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())  # no _best either
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"
    assert not (tmp_path / "experiment_results_llama32.pkl").exists()


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
    """Each node's slice-loss is its rank's sub-model of the round's global model (the checkpoint) on its own
    held-out batches, recomputed here in float64 by hand; the logged line is their num-tokens-weighted mean."""
    import ast
    import json
    import re

    from flwr.app import MessageType

    from fedtp_flwr.client.app import local_dataset
    from fedtp_flwr.data import IGNORE_INDEX, eval_batches
    from fedtp_flwr.model import ModelArgs, Transformer
    from fedtp_flwr.model.sharding import shard, shard_args

    grid = go(tmp_path, **{"num-server-rounds": 1, "client-eval": True})
    ckpt = load_run_checkpoint(tmp_path / "run-1" / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth")
    args = ModelArgs.from_params(json.loads(ckpt["config"]["model-args"]))
    evaluated = [(m, r) for m, r in zip(grid.delivered, grid.replies) if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluated) == 2
    tokens, losses, perplexities = [], [], []
    for msg, reply in evaluated:
        rank, world = int(msg.content["config"]["rank"]), int(msg.content["config"]["world-size"])
        model = Transformer(shard_args(args, world)).eval()
        model.load_state_dict(shard(ckpt["model_state_dict"], args, rank, world))
        data = local_dataset(grid.cfg, grid.node_configs[msg.metadata.dst_node_id], "eval", args.vocab_size)
        nll, n = 0.0, 0
        with torch.no_grad():
            for inputs, targets in eval_batches(data, grid.cfg.max_batch_size, grid.cfg.eval_batches or None):
                logp = torch.log_softmax(model(inputs).double(), dim=-1)
                keep = targets != IGNORE_INDEX
                nll -= logp[keep].gather(-1, targets[keep].unsqueeze(-1)).sum().item()
                n += int(keep.sum())
        got = reply.content["metrics"]
        assert got["num-tokens"] == n
        assert got["slice-loss"] == pytest.approx(nll / n, rel=1e-5)
        assert got["slice-perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        tokens.append(n), losses.append(nll / n), perplexities.append(math.exp(nll / n))
    (logged,) = re.findall(r"slice evaluation \(clients\): (\{[^}]*\})", caplog.text)
    logged = ast.literal_eval(logged)

    def mean(xs):  # weighted by each node's num-tokens, as the server reduces its clients' metrics
        return sum(t * x for t, x in zip(tokens, xs)) / sum(tokens)

    assert logged["slice-loss"] == pytest.approx(mean(losses), rel=1e-5)
    assert logged["slice-perplexity"] == pytest.approx(mean(perplexities), rel=1e-5)


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


def test_output_folders_are_new_for_every_run(tmp_path, monkeypatch):
    from fedtp_flwr.config import RunConfig
    from fedtp_flwr.server.app import resolve_output_dirs
    from fedtp_flwr.server.outputs import new_run_folder

    monkeypatch.chdir(tmp_path)
    assert resolve_output_dirs(RunConfig(), 7) == (tmp_path / "outputs" / "run-7", tmp_path / "outputs")
    named = RunConfig(output_dir=str(tmp_path / "mine"))
    assert resolve_output_dirs(named, 7) == (tmp_path / "mine" / "run-7", tmp_path / "mine")
    resumed = RunConfig(resume_from=str(tmp_path / "outputs" / "run-7" / "checkpoints" / "x_round1.pth"))
    assert resolve_output_dirs(resumed, 9) == (tmp_path / "outputs" / "run-9", tmp_path / "outputs")  # its own
    out, _ = resolve_output_dirs(RunConfig(), None)  # outside Flower: the UTC time names the folder
    assert out.parent == tmp_path / "outputs" and out.name.startswith("run-20")
    made = [new_run_folder(tmp_path / "outputs", "run-x") for _ in range(3)]  # never an existing folder
    assert [p.name for p in made] == ["run-x", "run-x-2", "run-x-3"]


@pytest.mark.slow
def test_two_runs_with_the_same_seed_key_keep_their_own_results(tmp_path, monkeypatch, caplog):
    """The seed's key leaves out the strategy: a FedAdam run and a DiLoCo run share it. Each keeps its results in
    its own folder; the merged file keeps the first run's entry and the log says where the second's is."""
    monkeypatch.chdir(tmp_path)
    cfg = {**BASE, "num-server-rounds": 1, "output-dir": ""}
    for run_id, strategy in ((11, "fedavg"), (12, "fedprox")):
        run(InProcessGrid(nodes(2), {**cfg, "strategy": strategy}), {**cfg, "strategy": strategy}, run_id=run_id)
    key = (2, 1e-3, False, 1, 42)
    own = {}
    for run_id in (11, 12):
        folder = tmp_path / "outputs" / f"run-{run_id}"
        assert (folder / "eval_res_llama32_ws2_r1.txt").is_file()
        assert (folder / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth").is_file()
        own[run_id] = read_results(folder / "experiment_results_llama32.pkl")[key]
    assert own[11] != own[12]  # not vacuous: the two runs differ
    merged = read_results(tmp_path / "outputs" / "experiment_results_llama32.pkl")
    assert merged == {key: own[11]}
    assert "already holds key (2, 0.001, False, 1, 42) from another run and keeps it" in caplog.text


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
