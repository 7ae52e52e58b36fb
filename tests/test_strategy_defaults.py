"""Every strategy trains at its defaults: the config's own list of strategies (config.STRATEGIES, so a new one cannot
be left out), each run at its defaults through the real server and client code (in-process grid) on the built-in
corpus with the default model, sees its held-out loss fall every round."""

import pytest

from fedtp_flwr.config import STRATEGIES, RunConfig
from fedtp_flwr.server.app import experiment_key, run
from fedtp_flwr.server.outputs import read_results
from fedtp_flwr.testing.inprocess import CachedClients, InProcessGrid

# The regime bench/strategy_defaults.py measured the defaults in (its SMALLER: 5 local steps of 2 x 32 tokens, 2 x 8
# x 32 held-out tokens, 3 rounds), so each strategy's run here is its chosen row of bench/results/strategy_defaults.md.
CONFIG = {"num-server-rounds": 3, "local-steps": 5, "batch-size": 2, "max-seq-len": 32, "eval-batches": 2,
          "max-batch-size": 8, "checkpoint-every": 0}


@pytest.fixture(scope="module")
def clients():
    """Shared by the strategies: their first rounds are the same computation, done once."""
    return CachedClients()


@pytest.mark.slow  # 3 in-process rounds of the default model per strategy: ~10-30 s each on 2 CPU cores
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_at_its_defaults_lowers_the_held_out_loss_every_round(tmp_path, strategy, clients, caplog):
    cfg = {**CONFIG, "strategy": strategy, "output-dir": str(tmp_path)}
    run(InProcessGrid([{"partition-id": i, "num-partitions": 2} for i in range(2)], cfg, handler=clients), cfg)
    history = read_results(tmp_path / "experiment_results_llama32.pkl")[experiment_key(RunConfig.from_run_config(cfg))]
    losses = [loss for _, loss, _ in history]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert "refusing the merged model" not in caplog.text
