"""Checks of fedtp_flwr/flower_harness.py against a toy Flower app generated into tmp_path.

The toy app needs only flwr and numpy (no torch): a FedAvg ServerApp over a 4-float
ArrayRecord and a ClientApp whose ``train`` adds ``1 + partition-id``. Run-config switches
make the ServerApp or the ClientApp raise, to check how failures surface.

Every test is also checked for leftover Flower/Ray processes (see ``no_leftovers``).
The tests that start Flower processes are marked slow.
"""

from __future__ import annotations

import os
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from fedtp_flwr.testing import flower_harness as fh

TOY_FILES = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "toyapp"
        version = "1.0.0"
        description = "Toy Flower app for the harness tests"
        license = "Apache-2.0"
        dependencies = ["flwr>=1.42.0"]

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "fedtp"

        [tool.flwr.app.components]
        serverapp = "toyapp.server_app:app"
        clientapp = "toyapp.client_app:app"

        [tool.flwr.app.config]
        num-server-rounds = 2
        min-nodes = 2
        fail-server = false
        fail-client = false
    """,
    "toyapp/__init__.py": "",
    "toyapp/server_app.py": """
        import numpy as np
        from flwr.app import ArrayRecord, ConfigRecord, Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg

        app = ServerApp()


        @app.main()
        def main(grid: Grid, context: Context) -> None:
            cfg = context.run_config
            if cfg["fail-server"]:
                raise RuntimeError("TOY-SERVER-FAILURE requested")
            rounds = int(cfg["num-server-rounds"])
            min_nodes = int(cfg["min-nodes"])
            strategy = FedAvg(
                fraction_evaluate=0.0,
                min_train_nodes=min_nodes,
                min_available_nodes=min_nodes,
            )
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
                num_rounds=rounds,
                train_config=ConfigRecord({"lr": 0.5}),
                timeout=120,
            )
            arrays = result.arrays.to_numpy_ndarrays()
            value = float(arrays[0][0]) if arrays else float("nan")
            print(f"TOY-FINAL rounds={rounds} value={value:.4f}", flush=True)
    """,
    "toyapp/client_app.py": """
        from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp

        app = ClientApp()


        @app.train()
        def train(msg: Message, context: Context) -> Message:
            if context.run_config["fail-client"]:
                raise RuntimeError("TOY-CLIENT-FAILURE requested")
            pid = int(context.node_config.get("partition-id", 0))
            data = context.node_config.get("data-path", "-")
            arr = msg.content["arrays"].to_numpy_ndarrays()[0] + 1.0 + pid
            print(f"TOY-TRAIN partition-id={pid} data-path={data}", flush=True)
            content = RecordDict(
                {
                    "arrays": ArrayRecord([arr]),
                    "metrics": MetricRecord({"num-examples": 10, "loss": float(pid)}),
                }
            )
            return Message(content=content, reply_to=msg)
    """,
}


def write_toy_app(directory: Path) -> Path:
    for rel, text in TOY_FILES.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def toy_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_app(tmp_path_factory.mktemp("toyapp"))


MARKER = "FEDTP_HARNESS_TEST_ID"


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch: pytest.MonkeyPatch):
    """Fail a test that leaves Flower/Ray processes behind.

    Other workers may run Flower on this machine at the same time, so a plain
    ``pgrep -f`` before/after diff is narrowed to processes carrying this test's marker
    (an environment variable every process the harness starts inherits).
    """
    test_id = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, test_id)
    before = fh.flower_processes()
    yield
    deadline = time.monotonic() + 10
    while True:
        ours = fh.processes_with_env(MARKER, test_id)
        new = {p: c for p, c in fh.flower_processes().items() if p not in before}
        new_ours = {p: c for p, c in new.items() if p in ours}
        if not ours and not new_ours:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"processes left behind: {ours or new_ours}")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------
# Quick checks (no Flower processes)
# --------------------------------------------------------------------------------------
def test_toml_value_and_kv() -> None:
    assert fh.toml_value(True) == "true"
    assert fh.toml_value(3) == "3"
    assert fh.toml_value(0.5) == "0.5"
    assert fh.toml_value('a "b"') == '"a \\"b\\""'
    assert fh._kv_string({"partition-id": 0, "data-path": "/x.jsonl"}) == (
        'partition-id=0 data-path="/x.jsonl"'
    )


def test_free_port_is_loopback_bindable() -> None:
    import socket

    port = fh.free_port()
    assert 20000 <= port <= 32000
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_loopback_classification() -> None:
    for addr in ("127.0.0.1:1", "[::ffff:127.0.0.1]:33031", "[::1]:5"):
        assert fh._is_loopback(addr), addr
    for addr in ("0.0.0.0:2024", "*:80", "[::]:80", "10.0.0.2:9"):
        assert not fh._is_loopback(addr), addr


def test_unknown_run_config_key_is_named(toy_app: Path) -> None:
    fh.check_run_config_keys(toy_app, {"num-server-rounds": 1, "fail-client": True})
    with pytest.raises(fh.HarnessError, match="no-such-key"):
        fh.check_run_config_keys(toy_app, {"no-such-key": 1})


def test_federations_section_is_refused(tmp_path: Path) -> None:
    app = write_toy_app(tmp_path / "app")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text() + '\n[tool.flwr.federations]\ndefault = "local"\n'
    )
    before = pyproject.read_text()
    with pytest.raises(fh.HarnessError, match="federations"):
        fh.run_simulation(app, timeout_s=30)
    assert pyproject.read_text() == before


def test_tls_files_and_node_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    tls = fh.make_tls_certificates(tmp_path / "certs")
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    priv, pub = fh.make_node_keypair(tmp_path / "keys", "node0")
    assert load_ssh_private_key(priv.read_bytes(), None).curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).curve.name == "secp384r1"
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------
# The harness's simulation and deployment paths (a run completes, a failed run is reported failed, ClientApp output
# stays on its SuperNode, a SuperNode is killed with its children, every process listens on loopback) are
# exercised on the real app by tests/test_flower_simulation.py and tests/test_flower_deployment.py.


@pytest.mark.slow
def test_deployment_run_that_cannot_finish_is_stopped_at_its_timeout(toy_app: Path) -> None:
    """The harness's timeout: a run that waits for a second node is stopped with `flwr stop`. The marker that the
    leftover check relies on reaches every process the harness starts. (TLS and node authentication are tested
    once, end to end, by tests/test_deployment_docs.py.)"""
    with fh.Deployment() as dep:
        assert dep.superlink.pid in fh.find_tagged_processes(dep.tag)
        assert fh.processes_with_env(MARKER, os.environ[MARKER])
        good = dep.start_supernode({"partition-id": 0, "num-partitions": 1})
        res = dep.run(toy_app, {"num-server-rounds": 1, "min-nodes": 2}, timeout_s=10)
        assert res.timed_out and res.returncode is None
        assert res.status == "finished:stopped", res.describe()
        assert "Waiting for nodes to connect" in res.log_text
        assert good.is_running()
    assert not dep.workdir.exists()  # the workdir was a temp dir
