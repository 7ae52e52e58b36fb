"""A client's error reaches the server's log as one line naming its cause, the same in simulation as in
deployment: the ClientApp answers with an error reply whose reason is that line (client/app.error_reply), and the
server shortens any other wording (Flower's, Ray's whole remote traceback) to it (server/replies.error_cause)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedtp_flwr.client.app import ClientAppStopped, error_line, evaluate_reply, train_reply
from fedtp_flwr.compat import ErrorCode, ensure_run_identity
from fedtp_flwr.config import RunConfig
from fedtp_flwr.data import DataError
from fedtp_flwr.server.app import run
from fedtp_flwr.server.replies import ReplyError, check_reply, error_cause
from fedtp_flwr.server.strategy import RunFailed
from fedtp_flwr.testing.inprocess import InProcessGrid

CAUSE = "DataError: /data/train.jsonl:3: invalid JSON: Expecting value (column 10)"

# What Flower 1.42's simulation sent before the ClientApp answered for itself (a bad JSON line at a client): a
# RayTaskError whose message is the remote traceback, in Flower's "<class ...>:<'...'>" wording (shortened here;
# the real one is about 3,900 characters).
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=6711, ip=127.0.0.1, actor_id=98ca77, repr=<flwr.simulation.ray_transport.ray_actor.ClientAppActor "
    "object at 0x7fd5cdb63010>)\n                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/site-packages/flwr/clientapp/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    '  File "/apps/fedtp_flwr/data/files.py", line 83, in _read_jsonl\n'
    '    raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None\n'
    "fedtp_flwr.data.errors.DataError: /data/train.jsonl:3: invalid JSON: Expecting value (column 10)\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=6711, ip=127.0.0.1)\n"
    '  File "/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: /data/train.jsonl:3: invalid JSON: Expecting value "
    "(column 10)'>"
)


@pytest.mark.parametrize("reason", [
    CAUSE,  # this project's ClientApp
    "<class 'fedtp_flwr.data.errors.DataError'>:<'/data/train.jsonl:3: invalid JSON: Expecting value (column 10)'>",
    RAY_REASON,
])
def test_every_wording_of_a_client_error_gives_its_one_line_cause(reason):
    assert error_cause(reason) == CAUSE


def test_other_reasons_pass_through_on_one_line():
    assert error_cause("Error: Node Unavailable") == "Error: Node Unavailable"  # the SuperLink's, for a lost node
    assert error_cause("two\n  lines ") == "two lines"
    assert error_cause('Traceback (most recent call last):\n  File "x.py", line 1\nsomething odd') == "something odd"


def test_error_line_is_the_type_and_message_on_one_line():
    assert error_line(DataError("/d.jsonl:3: invalid JSON: x")) == "DataError: /d.jsonl:3: invalid JSON: x"
    assert error_line(KeyError("rank")) == "KeyError: 'rank'"
    assert error_line(ValueError("a\n  b")) == "ValueError: a b"
    assert error_line(RuntimeError()) == "RuntimeError"
    assert len(error_line(ValueError("x" * 5000))) == 2003


def _server_message(round_: int = 3) -> Message:
    ensure_run_identity()
    return Message(RecordDict({"config": ConfigRecord({"server-round": round_})}), dst_node_id=1, message_type="train")


def test_a_failing_train_handler_replies_with_the_line_and_logs_it_once(caplog, monkeypatch):
    """The node's work raises: the reply is Flower's error reply (code 2) with the one line; the node logs that line
    once, its traceback only at DEBUG (a data error's message is the whole story)."""
    import fedtp_flwr.client.app as client

    def bad_data(content, cfg, node_config):
        raise DataError("/data/train.jsonl:3: invalid JSON: Expecting value (column 10)")

    monkeypatch.setattr(client, "train_slice", bad_data)
    caplog.set_level(logging.DEBUG, logger="flwr")
    reply = train_reply(_server_message(), RunConfig(), {})
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION == 2
    assert reply.error.reason == CAUSE
    errors = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in errors] == [f"round 3: this node could not train its slice: {CAUSE}"]
    assert errors[0].exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)  # the traceback, for debugging
    # what the server makes of it: the same line
    with pytest.raises(ReplyError) as e:
        check_reply(reply, {}, "float32", 10)
    assert str(e.value) == f"error reply (code 2): {CAUSE}"


def test_an_unexpected_exception_is_logged_with_its_traceback_on_the_node(caplog, monkeypatch):
    import fedtp_flwr.client.app as client

    def bug(content, cfg, node_config):
        raise KeyError("q_proj")

    monkeypatch.setattr(client, "evaluate_slice", bug)
    reply = evaluate_reply(_server_message(), RunConfig(), {})
    assert reply.error.reason == "KeyError: 'q_proj'"
    (rec,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rec.exc_info is not None and "could not evaluate its slice: KeyError: 'q_proj'" in rec.getMessage()


def test_sigterm_still_reaches_flower(monkeypatch):
    """ClientAppStopped is not answered here: Flower's own error reply, and the ClientApp process ends as failed."""
    import fedtp_flwr.client.app as client

    def stopped(content, cfg, node_config):
        raise ClientAppStopped("stopped (SIGTERM)")

    monkeypatch.setattr(client, "train_slice", stopped)
    with pytest.raises(ClientAppStopped):
        train_reply(_server_message(), RunConfig(), {})


def test_a_bad_json_line_at_a_client_is_one_line_in_the_servers_log(tmp_path, caplog):
    """In-process run, both nodes' data files broken (so no node trains and the run stops at once): each node's
    cause is on exactly one server log line, the drop line, and nothing is a multi-line dump."""
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "hello there"}\n{"text": "more"}\n{"text": broken\n', encoding="utf-8")
    missing = tmp_path / "missing.jsonl"
    cfg = {"num-server-rounds": 1, "world-size": 2, "model": "bytes-small", "tokenizer-path": "bytes",
           "max-seq-len": 32, "eval-batches": 1, "max-batch-size": 2, "output-dir": str(tmp_path / "out")}
    grid = InProcessGrid([{"data-path": str(bad)}, {"data-path": str(missing)}], cfg)
    with pytest.raises(RunFailed):
        run(grid, cfg)
    causes = {1: f"DataError: {bad}:3: invalid JSON: Expecting value (column 10)",
              2: f"DataError: {missing}: no such file or directory"}
    at_node = [r.getMessage() for r in caplog.records if Path(r.pathname).parts[-2:] == ("client", "app.py")]
    at_server = [r.getMessage() for r in caplog.records if Path(r.pathname).parts[-2:] != ("client", "app.py")]
    for node, cause in causes.items():
        (line,) = [m for m in at_server if cause in m]
        assert line.startswith(f"round 1: dropping reply from node {node} (rank ") and line.endswith(
            f"): error reply (code 2): {cause}"), line
        assert [m for m in at_node if cause in m] == [f"round 1: this node could not train its slice: {cause}"]
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in caplog.records if r.levelno >= logging.INFO)
    assert all(reply.has_error() and reply.error.reason in causes.values() for reply in grid.replies)
