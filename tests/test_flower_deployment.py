"""The real app (this repository) on Flower's deployment runtime: a SuperLink and SuperNodes on loopback.

Each SuperNode gets its own local data through `--node-config 'data-path="..."'` (a few hundred lines of one
play of the built-in corpus); runs go through `flwr run <app> <connection> --stream`. Covered (issue 5):

- SuperNodes train on their own data, the outputs are written, everything stops (the times are printed, not
  asserted: they depend on the machine's load), and, in the same run, a reply that comes after its round
  ended (round-quorum) is removed from the SuperLink unread;
- faults in one federation: a ClientApp that raises (invalid JSON in its data file) and a SuperNode killed
  mid-round (SIGKILL, with its ClientApp) do not stop the run; the log names both nodes and why, and a rank
  nobody returned keeps its previous values;
- a ClientApp that adds noise to its update is dropped as an outlier.
TLS and SuperNode authentication are tested once, by tests/test_deployment_docs.py running the guide as written.

fedtp_flwr/flower_harness.py starts and stops the processes (none may be left behind: conftest.py's
no_leftover_processes). The tests that start processes are marked slow.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from fedtp_flwr.server.outputs import run_folders
from fedtp_flwr.testing import flower_harness as fh

try:  # the run settings, output checks and log parsers shared with test_flower_simulation.py
    from conftest import APP_DIR, WORLD_SIZE, check_outputs, client_lines, node_ranks, small_config
except ImportError:  # collected as a package
    from tests.conftest import APP_DIR, WORLD_SIZE, check_outputs, client_lines, node_ranks, small_config  # type: ignore

from fedtp_flwr.model import build_model, preset_args
from fedtp_flwr.model.sharding import is_split, shard

pytestmark = pytest.mark.usefixtures("no_leftover_processes")  # no test here may leave a process behind

CORPUS = Path(__file__).resolve().parents[1] / "fedtp_flwr" / "data" / "corpus" / "train"
PLAYS = {"henry-v": 300, "the-tempest": 200}  # different sizes: the example counts show whose data was used


def write_node_data(directory: Path) -> list[tuple[Path, int]]:
    """One jsonl file per SuperNode: the first lines of one play. -> [(path, number of examples)]."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for play, n in PLAYS.items():
        lines = (CORPUS / f"{play}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        path = directory / f"{play}.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        files.append((path, n))
    return files


def deployment_config(output_dir: Path, **overrides) -> dict:
    return small_config(output_dir, **{"num-server-rounds": 1, **overrides})


def start_nodes(dep: fh.Deployment, node_configs: list[dict]) -> list[fh.ManagedProcess]:
    """Start SuperNodes side by side (faster than one after the other) and wait until all are online; each
    one's id (``node.extra["node_id"]``) is read from its output ("SuperNode ID: ...")."""
    nodes = [dep.start_supernode(cfg, wait_online=False) for cfg in node_configs]
    dep.wait_nodes_online(len(nodes), timeout_s=90)
    deadline = time.monotonic() + 30
    for node in nodes:
        while not (m := re.search(r"SuperNode ID: (\d+)", node.output)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert m, node.output[-3000:]
        node.extra["node_id"] = int(m.group(1))
    online = {int(nd["node-id"]) for nd in dep.list_nodes() if nd.get("status") == "online"}
    assert {n.extra["node_id"] for n in nodes} <= online
    return nodes


def node_id(node: fh.ManagedProcess) -> int:
    return int(node.extra["node_id"])


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_failing_and_killed_clients_do_not_stop_the_run(tmp_path: Path) -> None:
    """Three SuperNodes: one trains, one's ClientApp raises (invalid JSON in its data file), one is SIGKILLed
    (with its ClientApp) while it trains. The round returns at round-timeout with the surviving reply."""
    (good_data, good_n), (doomed_data, _) = write_node_data(tmp_path / "data")
    broken_data = tmp_path / "data" / "broken.jsonl"
    broken_data.write_text('{"text": "A fine first line."}\n{"text": not json}\n', encoding="utf-8")
    out = tmp_path / "outputs"
    timeout = 30.0
    with fh.Deployment(workdir=tmp_path / "dep") as dep:
        good, broken, doomed = start_nodes(dep, [{"data-path": str(p)} for p in (good_data, broken_data, doomed_data)])

        run_over = threading.Event()
        killed_at: list[float] = []

        def kill_when_training() -> None:
            while not run_over.is_set():
                if "received the rank" in doomed.output:
                    dep.kill_supernode(doomed)  # the SuperNode, its SuperExec and its ClientApp
                    killed_at.append(time.monotonic())
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_when_training, daemon=True)
        killer.start()
        cfg = deployment_config(out, **{"round-timeout": timeout, "min-available-nodes": 1})
        try:
            res = dep.run(APP_DIR, cfg, timeout_s=240)
        finally:
            run_over.set()
            killer.join(timeout=30)
        assert killed_at, "the SuperNode to kill never started training:\n" + doomed.output[-3000:]
        assert doomed.returncode == -9
        assert broken.is_running() and good.is_running()  # a failing ClientApp does not take its SuperNode down
    assert dep.survivors == {}
    res.assert_ok()
    log_text = res.log_text
    took = [float(x) for x in re.findall(r"round 1 took ([\d.]+) s", log_text)]
    print(f"faults: flwr run {res.duration_s:.1f} s, round 1 {took} s (round-timeout {timeout:g} s)")

    ranks = node_ranks(log_text)[1]
    ids = {name: node_id(n) for name, n in dict(good=good, broken=broken, doomed=doomed).items()}
    assert set(ranks) == set(ids.values()), log_text[-4000:]
    # The error reply is dropped with the node and the reason; the traceback is in that SuperNode's output.
    assert re.search(rf"round 1: dropping reply from node {ids['broken']} \(rank {ranks[ids['broken']]}\): "
                     r"error reply \(code \d+\): .*DataError.*invalid JSON", log_text), log_text[-4000:]
    assert "invalid JSON" in broken.output and "DataError" in broken.output
    # The killed node never answered: the round ended at round-timeout, naming it and its rank (or, had the
    # SuperLink missed its heartbeats within the round, by the SuperLink's "Node Unavailable" reply for it).
    doomed_rank = ranks[ids["doomed"]]
    assert re.search(rf"round 1: (no reply from node {ids['doomed']} \(rank {doomed_rank}\) within round-timeout "
                     rf"{timeout:g} s|dropping reply from node {ids['doomed']} \(rank {doomed_rank}\): error reply "
                     r"\(code 5\))", log_text), log_text[-4000:]
    assert "round 1: 1 valid reply" in log_text
    # Exactly one rank was trained (the surviving node's, possibly covering a failed node of the same rank);
    # the other rank has no valid reply and keeps its previous values.
    trained = ranks[ids["good"]]
    (untrained,) = set(range(WORLD_SIZE)) - {trained}
    assert f"round 1: no valid reply for rank(s) [{untrained}]; their slices keep their values" in log_text
    (line,) = client_lines(good.output)
    assert line["rank"] == trained and line["examples"] == good_n

    args = preset_args("llama3.2-tiny")
    before = build_model(args, seed=cfg["seed"]).state_dict()  # the run's initial model (seeded init)
    (folder,) = run_folders(out)
    after = torch.load(folder / "checkpoints" / "llama32_tiny_ws2_lr0.001_round1.pth", weights_only=True)[
        "model_state_dict"]
    for rank, should_change in ((trained, True), (untrained, False)):
        old, new = shard(before, args, rank, WORLD_SIZE), shard(after, args, rank, WORLD_SIZE)
        for name in (k for k in old if is_split(k)):
            assert torch.equal(old[name], new[name]) != should_change, (rank, name)
    history = check_outputs(out, rounds=1)
    assert history[1][2] < history[0][2], history


def test_superlink_error_reply_for_a_lost_node_names_that_node(caplog: pytest.LogCaptureFixture) -> None:
    """When the SuperLink loses a node (no heartbeat) it answers for it: an error reply whose source is the
    SuperLink's own node id. The strategy names the node the message was sent to. (No processes.)"""
    from flwr.app import ConfigRecord, Error, Message, Metadata
    from flwr.supercore.task_identity import TaskIdentity

    from fedtp_flwr.compat import set_message_id
    from fedtp_flwr.config import RunConfig
    from fedtp_flwr.model import ModelArgs
    from fedtp_flwr.server.strategy import FederatedTensorParallel
    from fedtp_flwr.wire import encode

    class Grid:
        def get_node_ids(self):
            return [101, 202]

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    try:
        args = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8)
        strategy = FederatedTensorParallel(args, RunConfig(world_size=2, round_timeout=5.0))
        state = build_model(args, seed=0).state_dict()
        msgs = list(strategy.configure_train(1, encode(state), ConfigRecord(), Grid()))
        for i, m in enumerate(msgs):  # what the grid does when it pushes them
            set_message_id(m.metadata, f"msg-{i}")
        lost = next(m for m in msgs if m.metadata.dst_node_id == 202)
        meta = Metadata(run_id=7, message_id="", src_node_id=1, dst_node_id=1,
                        reply_to_message_id=lost.metadata.message_id, group_id="", created_at=time.time(), ttl=60,
                        message_type=lost.metadata.message_type)
        reply = Message(metadata=meta, error=Error(code=5, reason="Error: Node Unavailable"))
        assert strategy.aggregate_train(1, [reply]) == (None, None)  # nothing valid: round skipped
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
    rank = strategy.ranks[1][202]
    assert f"dropping reply from node 202 (rank {rank}): error reply (code 5): Error: Node Unavailable" in caplog.text
    assert f"no reply from node 101 (rank {strategy.ranks[1][101]}) within round-timeout 5 s" in caplog.text
    assert "no reply from node 202" not in caplog.text


ATTACKER_CLIENT_APP = '''"""A ClientApp that trains honestly, then adds Gaussian noise (std 1) to every array it sends back when its
data-path names an attacker: what a malicious or broken client machine could send (test only)."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtp_flwr.client.app import evaluate_reply, train_reply
from fedtp_flwr.config import RunConfig

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_reply(msg, RunConfig.from_run_config(context.run_config), context.node_config)
    if "attacker" in str(context.node_config.get("data-path", "")):
        rng = np.random.default_rng(0)
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord(
            {k: Array((a.numpy() + rng.normal(0.0, 1.0, a.shape)).astype(a.numpy().dtype)) for k, a in arrays.items()})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_reply(msg, RunConfig.from_run_config(context.run_config), context.node_config)
'''


@pytest.mark.slow
def test_a_noisy_update_from_a_real_supernode_is_dropped(tmp_path: Path) -> None:
    """Three SuperNodes of an app whose ClientApp on one machine adds noise (std 1) to its trained slice: the
    server names that node, drops its update as an outlier, and the run completes."""
    import shutil

    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(
        ".git", "tests", "bench", "docs", "outputs", "checkpoints", "*.egg-info", "__pycache__", "build"))
    for folder in ("tests", "bench", "docs"):  # Flower refuses a fab-exclude pattern that matches nothing
        (app / folder).mkdir()
        (app / folder / "README.md").write_text("not part of the app\n", encoding="utf-8")
    (app / "client_app.py").write_text(ATTACKER_CLIENT_APP, encoding="utf-8")
    (a_data, _), (b_data, _) = write_node_data(tmp_path / "data")
    attacker_data = tmp_path / "data" / "attacker.jsonl"
    attacker_data.write_text(a_data.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "outputs"
    with fh.Deployment(workdir=tmp_path / "dep") as dep:
        nodes = start_nodes(dep, [{"data-path": str(p)} for p in (a_data, b_data, attacker_data)])
        res = dep.run(app, deployment_config(out, **{"min-available-nodes": 3}), timeout_s=240)
    assert dep.survivors == {}
    res.assert_ok()
    attacker = node_id(nodes[2])
    assert re.search(rf"round 1: dropping reply from node {attacker} \(rank \d\): .*outlier-norm-factor",
                     res.log_text), res.log_text[-4000:]
    assert not re.search(rf"dropping reply from node ({node_id(nodes[0])}|{node_id(nodes[1])})", res.log_text)
    assert (out / "experiment_results_llama32.pkl").exists()


@pytest.mark.slow
def test_supernodes_train_on_their_own_data_and_a_late_reply_is_removed_unread(tmp_path: Path) -> None:
    """Three SuperNodes, round-quorum 0.6: one node's ClientApp is paused (SIGSTOP) while it trains, so the
    round ends once the other two (one per rank) replied; resumed then, its reply comes after its round.
    The server names it, never pulls it, and removes it from the SuperLink unread (pull.discard_replies).
    The same run is the deployment's plain path: each node trains the slice of the rank the server gave it on
    its own data file, its output stays on its SuperNode, both rounds merge, and every process listens on
    loopback."""
    (data_a, n_a), (data_b, n_b) = write_node_data(tmp_path / "data")
    files = [(data_a, n_a), (data_b, n_b), (data_a, n_a)]
    out = tmp_path / "outputs"
    t0 = time.monotonic()
    with fh.Deployment(workdir=tmp_path / "dep") as dep:
        nodes = start_nodes(dep, [{"data-path": str(p)} for p, _ in files])
        t_up = time.monotonic() - t0
        # Ranks go 0, 1, 0 in node id order: the node with the largest id shares rank 0 and can be late.
        *fast, slow = sorted(nodes, key=node_id)
        run_over = threading.Event()
        paused: list[int] = []

        def pause_then_resume() -> None:
            while not run_over.is_set() and "received the rank" not in slow.output:
                time.sleep(0.05)
            paused.extend(dep.signal_clientapps(slow, signal.SIGSTOP))
            # each fast node's second reply (the first answers the server's identity query) is its slice
            while not run_over.is_set() and not all(n.output.count("Sent successfully") >= 2 for n in fast):
                time.sleep(0.1)
            time.sleep(3.0)  # the server pulls the two replies and ends the round (it polls every second)
            dep.signal_clientapps(slow, signal.SIGCONT)

        worker = threading.Thread(target=pause_then_resume, daemon=True)
        worker.start()
        cfg = deployment_config(out, **{"num-server-rounds": 2, "round-quorum": 0.6,
                                        "min-available-nodes": 3, "outlier-norm-factor": 0.0})
        try:
            res = dep.run(APP_DIR, cfg, timeout_s=300)
        finally:
            run_over.set()
            worker.join(timeout=30)
            dep.signal_clientapps(slow, signal.SIGCONT)
        t_close = time.monotonic()
    print(f"deployment: up in {t_up:.1f} s, flwr run {res.duration_s:.1f} s, shut down in "
          f"{time.monotonic() - t_close:.1f} s")
    assert paused, "the slow node's ClientApp was never found"
    res.assert_ok()
    assert dep.survivors == {}
    assert (dep.address, "flower-superlin") in res.listeners and res.non_loopback_listeners == []
    assert (tmp_path / "dep" / "logs" / "superlink.log").is_file()
    log_text = res.log_text
    history = check_outputs(out, rounds=2)
    assert history[2][2] < history[0][2], history
    assert "received the rank" not in log_text  # the server's log has no client output
    ranks = node_ranks(log_text)
    for node, (path, n_examples) in zip(nodes, files):
        assert f'data-path="{path}"' in node.output  # the command line, first line of its output
        if node is slow:
            continue
        # the slice of the rank the server gave this node in each round, trained on this node's own file
        lines = client_lines(node.output)
        assert [ln["round"] for ln in lines] == [1, 2], node.output[-3000:]
        for ln in lines:
            assert ln["rank"] == ranks[ln["round"]][node_id(node)], ln
            assert ln["examples"] == n_examples and ln["device"] == "cpu", ln
    rank = node_ranks(log_text)[1][node_id(slow)]
    assert f"round 1: no reply from node {node_id(slow)} (rank {rank}) before the round ended at round-quorum 0.6" \
        in log_text, log_text[-4000:]
    assert "round 1: 2 valid replies" in log_text
    removed = [int(n) for n in re.findall(r"removed (\d+) late repl(?:y|ies) from the SuperLink unread", log_text)]
    assert sum(removed) >= 1, log_text[-4000:]
    assert "a late reply)" not in log_text  # no late reply was ever pulled as if it answered a later round
