"""fedtp_flwr.compat against the installed Flower and torchao: one quick test per private name it holds, so an
upgrade that moves one fails here, by name, before a deployed round does (no stand-ins for the libraries)."""

from __future__ import annotations

import importlib
import inspect
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtp_flwr import compat

REPO = Path(__file__).resolve().parents[1]


def test_versions_outside_the_supported_minor_are_refused_with_the_range():
    compat.check_version("flwr", "1.42.7")
    compat.check_version("torchao", "0.18.1+cpu")
    for dist, version in (("flwr", "1.43.0"), ("flwr", "1.41.2"), ("torchao", "0.19.0"), ("torchao", "0.13.0")):
        with pytest.raises(ImportError, match=rf"supports {dist} >= .*, but {dist} {version} is installed"):
            compat.check_version(dist, version)


def test_pyproject_pins_the_supported_minors():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for dist, (low, high) in compat.SUPPORTED.items():
        assert f'"{dist}' in text and f">={low}" in text and f"<{high}" in text, dist


def test_runtime_client_is_httpgrids_connecting_property_with_the_three_calls():
    assert isinstance(inspect.getattr_static(compat.HttpGrid, "_runtime_client"), property)
    grid = compat.HttpGrid("127.0.0.1:1", insecure=True, token="t")  # connects lazily: nothing is dialled yet
    client = compat.runtime_client(grid)
    for call in ("PullMessages", "PullObject", "ConfirmMessageReceived"):
        assert callable(getattr(client, call)), call
    client.close()


def test_set_message_id_is_what_metadata_reports(server_identity):
    msg = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    compat.set_message_id(msg.metadata, "abc123")
    assert msg.metadata.message_id == "abc123"


def test_ensure_run_identity_sets_a_run_only_when_none_is_set(server_identity):
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity.run_id
    compat.ensure_run_identity()
    assert TaskIdentity.run_id == before  # the fixture's run stands
    assert "_run_id" in vars(TaskIdentity)


def test_object_format_reads_flowers_own_array_record():
    data = np.arange(3_000_000, dtype=np.float32)  # 12 MB: three 5 MiB chunks
    record = ArrayRecord({"w": Array(data), "b": Array(np.ones(3, np.float32))})
    objects = {k: o.deflate() for k, o in get_all_nested_objects(record).items()}
    kind, children = compat.object_head(objects[record.object_id])
    assert kind == "ArrayRecord" and compat.inflatable_class(kind) is ArrayRecord
    names = compat.record_children(compat.object_body(objects[record.object_id]))
    assert set(names) == {"w", "b"} and set(names.values()) <= set(children)
    content = objects[names["w"]]
    kind, chunk_ids = compat.object_head(content)
    dtype, shape, stype, order = compat.array_layout(compat.object_body(content), chunk_ids)
    assert kind == "Array" and (dtype, shape) == ("float32", (3_000_000,)) and stype == record["w"].stype
    assert len(order) == 3 and all(compat.object_head(objects[c])[0] == "ArrayChunk" for c in order)
    assert compat.inflatable_class("NotAType") is None


def test_pull_request_messages_take_the_fields_pull_sets():
    req = compat.PullAppMessagesRequest(message_ids=["a", "b"])
    assert list(req.message_ids) == ["a", "b"]
    node = compat.HttpGrid("127.0.0.1:1", insecure=True, token="t").node
    conf = compat.ConfirmMessageReceivedRequest(node=node, run_id=5, message_object_id="m")
    assert conf.run_id == 5 and conf.message_object_id == "m"
    assert isinstance(compat.PULL_MAX_TIME, (int, float)) and compat.PULL_INITIAL_BACKOFF <= compat.PULL_BACKOFF_CAP
    assert issubclass(compat.ObjectPullError, Exception) and issubclass(compat.ObjectUnavailableError, Exception)
    assert len(inspect.signature(compat.make_pull_object_fn_protobuf).parameters) == 3


def test_error_reply_metadata_makes_a_reply_flower_accepts(server_identity):
    grid = compat.HttpGrid("127.0.0.1:1", insecure=True, token="t")
    msg = compat.make_message(metadata=compat.error_reply_metadata(grid, 1, "sent-9"),
                              error=Error(code=compat.ErrorCode.UNKNOWN, reason="bad"))
    assert msg.has_error() and msg.metadata.reply_to_message_id == "sent-9"
    assert msg.metadata.src_node_id == grid.node.node_id


def test_client_app_error_code_is_the_one_flower_gives_a_clientapp_exception():
    """client/app.error_reply answers with the code Flower's own runtimes give a ClientApp's exception."""
    import flwr.server.superlink.fleet.vce.vce_api as simulation
    import flwr.supernode.runtime.run_clientapp as deployment

    assert compat.ErrorCode.CLIENT_APP_RAISED_EXCEPTION == 2
    for runtime in (simulation, deployment):
        assert "ErrorCode.CLIENT_APP_RAISED_EXCEPTION" in inspect.getsource(runtime)


def test_parse_config_args_reads_run_config_as_flwr_run_does(tmp_path):
    """tools/check_config reads --run-config with flwr run's own parser: TOML values, dotted keys flattened, a
    .toml file."""
    assert compat.parse_config_args(['a=1 b="x y" c.d=true e=1e-3']) == {"a": 1, "b": "x y", "c.d": True, "e": 0.001}
    (tmp_path / "r.toml").write_text('world-size = 4\n[train]\nlr = 0.1\n', encoding="utf-8")
    assert compat.parse_config_args([str(tmp_path / "r.toml")]) == {"world-size": 4, "train.lr": 0.1}
    flwr_run = importlib.import_module("flwr.cli.run.run")  # the module (flwr.cli.run.run is also its function)
    assert "parse_config_args(config_overrides)" in inspect.getsource(flwr_run)  # what `flwr run` calls


def test_trim_mean_cuts_each_tail():
    values = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert compat.trim_mean(values, 0.2).tolist() == [2.0]


def _reply(values: list[float], n: int = 4) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.array(values, np.float32))}),
                               "metrics": MetricRecord({"num-examples": n})}),
                   dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("make, names", [(lambda: FedAdam(eta=0.1), {"m_t", "v_t"}),
                                         (lambda: FedAvgM(server_momentum=0.9), {"momentum_vector"})])
def test_strategy_state_is_what_flowers_rules_keep_between_rounds(make, names, server_identity):
    """The state found (what a rule set or changed on itself since it was built) is exactly the moments / momentum
    Flower's rules keep between rounds: their copy of the global model (MODEL_COPY, set by configure_train from the
    model it is given) is left out."""
    rule = make()
    built = compat.strategy_baseline(rule)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    list(rule.configure_train(1, arrays, ConfigRecord(), _TwoNodes()))  # the rule keeps the current arrays
    copy = getattr(rule, compat.MODEL_COPY)
    np.testing.assert_array_equal(np.asarray(copy["w"].numpy() if isinstance(copy, ArrayRecord) else copy["w"]),
                                  arrays["w"].numpy())
    assert compat.strategy_state(rule, built) == {}
    rule.aggregate_train(1, [_reply([1.0, 2.0])])
    state = compat.strategy_state(rule, built)
    assert set(state) == names
    snapshot = compat.snapshot_strategy_state(rule)
    rule.aggregate_train(2, [_reply([3.0, 3.0])])
    assert any(not np.array_equal(np.asarray(_values(compat.strategy_state(rule, built)[k])),
                                  np.asarray(_values(state[k]))) for k in names)
    compat.restore_strategy_state(rule, snapshot)
    for k in names:
        np.testing.assert_array_equal(np.asarray(_values(compat.strategy_state(rule, built)[k])),
                                      np.asarray(_values(state[k])))
    compat.load_strategy_state(rule, state)
    for not_state in (compat.MODEL_COPY, "aggregate_train"):
        with pytest.raises(ValueError, match="is not state"):
            compat.load_strategy_state(rule, {not_state: {}})


def _values(value):
    return list(value.values()) if isinstance(value, dict) else value


class _TwoNodes:
    """A grid with two nodes (the rules' default minimum): configure_train records the arrays it was given."""

    def get_node_ids(self):
        return [1, 2]


def test_torchao_adamw_is_a_torch_optimizer_taking_bf16_stochastic_rounding():
    cls = compat.torchao_adamw()
    assert issubclass(cls, torch.optim.Optimizer)
    params = inspect.signature(cls).parameters
    assert {"lr", "betas", "eps", "weight_decay", "bf16_stochastic_round"} <= set(params)


def test_fab_patterns_and_builder():
    assert "**/*.py" in compat.fab_include_patterns()
    with zipfile.ZipFile(io.BytesIO(compat.build_fab(REPO))) as fab:
        assert "server_app.py" in fab.namelist()
