"""The run config: one typed object, in step with pyproject.toml and docs/configuration.md."""

from pathlib import Path

import pytest
import tomllib

from fedtp_flwr.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_key_with_the_same_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_dict()
    assert set(declared) == set(defaults)
    for key, value in declared.items():
        assert value == defaults[key] and type(value) is type(defaults[key]), key
    assert RunConfig.from_run_config(declared) == RunConfig()


def test_the_configuration_reference_holds_both_tables_as_generated():
    """docs/configuration.md's key tables are markdown_table()'s output, line for line (python -m fedtp_flwr.config):
    a key's help, default or choices cannot drift from the code."""
    from fedtp_flwr.config import markdown_table

    page = (ROOT / "docs" / "configuration.md").read_text()
    for table in (markdown_table(), markdown_table(advanced=True)):
        assert table in page, ("docs/configuration.md does not hold this table as `python -m fedtp_flwr.config` "
                               "prints it; paste it in place of the old one:\n" + table)


def test_the_configuration_reference_lists_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in RunConfig.keys() if f"`{k}`" not in page]
    assert not missing


def test_3b_recipe_parses():
    recipe = tomllib.loads((ROOT / "configs" / "llama32-3b.toml").read_text())
    cfg = RunConfig.from_run_config(recipe)
    assert cfg.model == "llama3.2-3b" and cfg.learning_rate == 1e-5 and cfg.world_size == 2


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_small_gpu_recipes_parse_and_use_the_benchmarked_options(world_size):
    """Each recipe is the "best" option of bench/client_memory.py, whose 3B figure docs/memory.md quotes."""
    import json

    recipe = tomllib.loads((ROOT / "configs" / f"llama32-3b-small-gpu-w{world_size}.toml").read_text())
    cfg = RunConfig.from_run_config(recipe)
    assert cfg.world_size == world_size and cfg.vocab_parallel and cfg.optimizer_in_backward
    bench = json.loads((ROOT / "bench" / "results" / "client_memory.json").read_text())
    for key, value in bench["3b_best"]["config"].items():
        assert recipe[key] == value, key


def test_slow_link_recipe_is_the_w2_recipe_with_diloco_and_many_local_steps():
    slow = tomllib.loads((ROOT / "configs" / "llama32-3b-slow-link-w2.toml").read_text())
    base = tomllib.loads((ROOT / "configs" / "llama32-3b-small-gpu-w2.toml").read_text())
    changed = {k for k in set(slow) | set(base) if slow.get(k) != base.get(k)}
    assert changed == {"strategy", "server-learning-rate", "server-momentum", "local-steps"}
    cfg = RunConfig.from_run_config(slow)
    assert cfg.strategy == "diloco" and cfg.local_steps >= 100 and cfg.upload_codec == "int4-delta"


@pytest.mark.parametrize("key,value,match", [
    ("world-size", "2", "expected int"),
    ("learning-rate", -1e-5, "must be a finite number > 0"),
    ("learning-rate", 0, "must be a finite number > 0"),
    ("device", "tpu", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("lr-schedule", "linear", "choose one of"),
    ("strategy", "fedsgd", "choose one of"),
    ("enable-swapping", 1, "expected bool"),
    ("wire-dtype", "int8", "choose one of"),
    ("context-bits", 2, "choose one of"),
    ("local-steps", 0, "an integer >= 1"),
    ("max-grad-norm", -1.0, ">= 0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        RunConfig.from_run_config({key: value})
    assert repr(key) in str(e.value)


def test_integer_is_accepted_for_a_float_key():
    # TOML `learning-rate = 1` arrives as an int
    assert RunConfig.from_run_config({"learning-rate": 1}).learning_rate == 1.0


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_run_config({"learning_rate": 1e-3})


def test_local_epochs_replace_local_steps():
    from fedtp_flwr.client.app import local_step_count

    steps = RunConfig.from_run_config({"local-steps": 7, "batch-size": 4, "grad-accum-steps": 2})
    assert local_step_count(steps, n_rows=1000) == 7
    epochs = RunConfig.from_run_config({"local-epochs": 1.5, "batch-size": 4, "grad-accum-steps": 2})
    assert local_step_count(epochs, n_rows=100) == 19  # ceil(1.5 * 100 / 8)
    assert local_step_count(epochs, n_rows=1) == 1


def test_every_strategy_choice_builds_its_flower_strategy():
    from fedtp_flwr.config import STRATEGIES
    from fedtp_flwr.server.strategy import make_inner_strategy

    built = {name: type(make_inner_strategy(RunConfig(strategy=name))).__name__ for name in STRATEGIES}
    assert built == {"fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi",
                     "fedadagrad": "FedAdagrad", "fedprox": "FedProx", "diloco": "DiLoCo"}


def test_choice_sets_are_the_implementing_modules_own():
    import torch

    from fedtp_flwr import training, wire
    from fedtp_flwr.config import ROBUST_RULES, WEIGHTINGS
    from fedtp_flwr.data import partition
    from fedtp_flwr.model import context, preset_args, quant
    from fedtp_flwr.server.aggregation import WeightedFold
    from fedtp_flwr.server.robust import robust_mean

    keys = RunConfig.keys()
    choices = {k: tuple(f.metadata["choices"]) for k, f in keys.items()}
    assert choices["wire-dtype"] == tuple(wire.WIRE_DTYPES)
    # context-bits: the frozen rest's own widths, each a layout quant.py has; a codec's bits come from wire.py's
    # one table and are quant.py layouts too (a new layout there enables neither a codec nor a context width)
    assert choices["context-bits"] == context.CONTEXT_BITS == (4, 8, 16) and set(context.CONTEXT_BITS) <= set(quant.BITS)
    assert choices["upload-codec"] == tuple(wire.UPLOAD_CODEC_BITS)
    assert choices["download-codec"] == tuple(wire.DOWNLOAD_CODEC_BITS)
    for table in (wire.UPLOAD_CODEC_BITS, wire.DOWNLOAD_CODEC_BITS):
        assert {b for b in table.values() if b is not None} <= set(quant.QMAX)  # the integer layouts
    assert [RunConfig(upload_codec=c, download_codec="wire").delta_bits for c in wire.UPLOAD_CODEC_BITS] == [None, 8, 4]
    assert choices["partitioning"] == partition.SCHEMES
    assert choices["lr-schedule"] == training.LR_SCHEDULES
    assert choices["precision"] == training.PRECISIONS
    assert choices["optimizer"] == training.OPTIMIZERS
    assert choices["client-param-dtype"] == tuple(training.PARAM_DTYPES)
    # The server's rules are declared in config (a ClientApp must not import the server); each one is implemented.
    assert set(choices["merge-weighting"]) == {"auto", *WEIGHTINGS}
    assert set(choices["rank-merge"]) == {"mean", *ROBUST_RULES}
    for weighting in WEIGHTINGS:
        WeightedFold({}, preset_args("llama3.2-tiny"), 1, weighting)
    for rule in ROBUST_RULES:
        assert robust_mean([torch.ones(3), torch.ones(3)], rule).tolist() == [1.0, 1.0, 1.0]
