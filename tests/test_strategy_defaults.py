"""Every strategy trains at its defaults, and resumes exactly: the config's own list of strategies
(config.STRATEGIES, so a new one cannot be left out), each run at its defaults through the real server and client
code (in-process grid) on the built-in corpus with the default model, sees its held-out loss fall every round; a run
resumed from its round-1 checkpoint (the nodes under other ids) then gives rounds 2 and 3 bit for bit, so the rule's
state (FedOpt's moments, FedAvgM's and DiLoCo's momentum) is in the checkpoint whatever its names."""

import pytest
import torch

from fedtp_flwr.config import STRATEGIES, RunConfig
from fedtp_flwr.server.app import experiment_key, run
from fedtp_flwr.server.outputs import load_run_checkpoint, read_results
from fedtp_flwr.testing.inprocess import CachedClients, InProcessGrid

# The regime bench/strategy_defaults.py measured the defaults in (its SMALLER: 5 local steps of 2 x 32 tokens, 2 x 8
# x 32 held-out tokens, 3 rounds), so each strategy's run here is its chosen row of bench/results/strategy_defaults.md.
CONFIG = {"num-server-rounds": 3, "local-steps": 5, "batch-size": 2, "max-seq-len": 32, "eval-batches": 2,
          "max-batch-size": 8}
NODES = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
CKPT = "llama32_tiny_ws2_lr0.001_round{}.pth"


@pytest.fixture(scope="module")
def clients():
    """Shared by the runs: a message already answered (same node, same records) is answered again without training.
    The resumed run's clients train only if it sends them something else than the uninterrupted run did."""
    return CachedClients()


@pytest.mark.slow  # 3 in-process rounds of the default model per strategy: ~10-30 s each on 2 CPU cores
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_at_its_defaults_lowers_the_held_out_loss_every_round_and_resumes_exactly(
        tmp_path, strategy, clients, caplog):
    cfg = {**CONFIG, "strategy": strategy, "output-dir": str(tmp_path)}
    run(InProcessGrid(NODES, cfg, handler=clients, node_ids=[7, 3]), cfg, run_id=1)
    key = experiment_key(RunConfig.from_run_config(cfg))
    history = read_results(tmp_path / "run-1" / "experiment_results_llama32.pkl")[key]
    losses = [loss for _, loss, _ in history]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert "refusing the merged model" not in caplog.text

    resumed = {**cfg, "resume-from": str(tmp_path / "run-1" / "checkpoints" / CKPT.format(1))}
    run(InProcessGrid(NODES, resumed, handler=clients, node_ids=[2, 9]), resumed, run_id=2)
    assert read_results(tmp_path / "run-2" / "experiment_results_llama32.pkl")[key] == history
    for r in (2, 3):
        a = load_run_checkpoint(tmp_path / "run-1" / "checkpoints" / CKPT.format(r))
        b = load_run_checkpoint(tmp_path / "run-2" / "checkpoints" / CKPT.format(r))
        assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    has_server_step = RunConfig(strategy=strategy).effective_server_learning_rate is not None
    assert bool(a["strategy_state"]) == has_server_step  # not vacuous: a rule with a server step has state
