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
    ("server-learning-rate", 0.0, r"must be > 0, or -1 \(auto"),
    ("server-learning-rate", -0.5, r"must be > 0, or -1 \(auto"),
    ("server-learning-rate", -2.0, ">= -1"),
    ("server-momentum", -0.5, r"must be >= 0, or -1 \(auto"),
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


def _rule_settings(rule) -> dict:
    """The server-side settings a Flower rule was built with (the attributes its __init__ stores)."""
    names = ("server_learning_rate", "server_momentum", "eta", "beta_1", "beta_2", "tau", "proximal_mu")
    return {name: getattr(rule, name) for name in names if hasattr(rule, name)}


@pytest.mark.parametrize("explicit", [False, True])
def test_every_strategy_choice_builds_its_flower_strategy_with_the_configs_settings(explicit):
    """Each choice of STRATEGIES builds its class with the config's settings: at auto the strategy's measured defaults
    (SERVER_LR, ETA_PER_LR x learning-rate, SERVER_MOMENTUM), else the values set (a setting dropped from or misrouted
    in the factory fails here)."""
    from fedtp_flwr.config import ETA_PER_LR, SERVER_LR, SERVER_MOMENTUM, STRATEGIES
    from fedtp_flwr.server.strategy import make_inner_strategy

    keys = dict(server_learning_rate=0.37, server_momentum=0.61, proximal_mu=0.23) if explicit else {}
    client_lr = 2e-4
    built = {}
    for name in STRATEGIES:
        rule = make_inner_strategy(RunConfig(strategy=name, learning_rate=client_lr, **keys))
        built[name] = (type(rule).__name__, _rule_settings(rule))
    mu_prox = 0.23 if explicit else RunConfig().proximal_mu
    lr = {s: 0.37 if explicit else SERVER_LR[s] for s in SERVER_LR}
    eta = {s: 0.37 if explicit else ETA_PER_LR[s] * client_lr for s in ETA_PER_LR}
    mu = {s: 0.61 if explicit else SERVER_MOMENTUM[s] for s in SERVER_MOMENTUM}
    assert built == {
        "fedavg": ("FedAvg", {}),
        "fedprox": ("FedProx", {"proximal_mu": mu_prox}),
        "fedavgm": ("FedAvgM", {"server_learning_rate": lr["fedavgm"], "server_momentum": mu["fedavgm"]}),
        "fedadam": ("FedAdam", {"eta": eta["fedadam"], "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
        "fedyogi": ("FedYogi", {"eta": eta["fedyogi"], "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
        "fedadagrad": ("FedAdagrad", {"eta": eta["fedadagrad"], "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-3}),
        "diloco": ("DiLoCo", {"server_learning_rate": lr["diloco"], "server_momentum": mu["diloco"]}),
    }


def test_server_keys_auto_resolve_to_the_strategys_measured_default_and_a_set_value_wins():
    from fedtp_flwr.config import ETA_PER_LR, SERVER_LR, SERVER_MOMENTUM, STRATEGIES

    assert set(SERVER_LR) | set(ETA_PER_LR) == set(STRATEGIES) - {"fedavg", "fedprox"}
    for name in STRATEGIES:
        cfg = RunConfig(strategy=name, learning_rate=3e-4)
        lr = SERVER_LR[name] if name in SERVER_LR else ETA_PER_LR[name] * 3e-4 if name in ETA_PER_LR else None
        assert (cfg.effective_server_learning_rate, cfg.effective_server_momentum) == (lr, SERVER_MOMENTUM.get(name))
    for name in SERVER_LR:  # no strategy with a server step defaults to FedAvg's (lr 1, momentum 0)
        assert (SERVER_LR[name], SERVER_MOMENTUM[name]) != (1.0, 0.0), name
    assert RunConfig(strategy="diloco", server_learning_rate=0.3).effective_server_learning_rate == 0.3
    assert RunConfig(strategy="fedadam", server_learning_rate=0.3).effective_server_learning_rate == 0.3
    assert RunConfig(strategy="diloco", server_momentum=0.0).effective_server_momentum == 0.0  # 0 is a value
    assert RunConfig(strategy="fedavg", server_learning_rate=0.3).effective_server_learning_rate is None
    assert RunConfig(strategy="fedadam", server_momentum=0.3).effective_server_momentum is None


def test_server_defaults_are_the_benchmarks_choice():
    """The auto values are what bench/strategy_defaults.py chose (its results file) for every strategy with a server
    step, the FedOpt etas as multiples of the benchmark's learning-rate: re-running the benchmark to another choice
    fails here until the defaults follow."""
    import json

    from fedtp_flwr.config import ETA_PER_LR, SERVER_LR, SERVER_MOMENTUM

    doc = json.loads((ROOT / "bench" / "results" / "strategy_defaults.json").read_text())
    client_lr = doc["run_config"]["learning-rate"]
    chosen = {name: (c["server-learning-rate"], c["server-momentum"]) for name, c in doc["chosen"].items()}
    ours = {**{name: (SERVER_LR[name], SERVER_MOMENTUM[name]) for name in SERVER_LR},
            **{name: (pytest.approx(k * client_lr), None) for name, k in ETA_PER_LR.items()}}
    assert chosen == ours
    for name, (lr, mu) in chosen.items():  # the chosen row fell every round
        row = next(r for r in doc["rows"] if (r["strategy"], r["server_learning_rate"], r["server_momentum"])
                   == (name, lr, mu))
        assert row["fell_every_round"] and all(b < a for a, b in zip(row["loss"], row["loss"][1:]))


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
