"""The package's layout holds: a ClientApp loads no server code, the arrows between the folders run one way,
and the FAB that `flwr run` ships holds what the two apps import and nothing that only tests or tools use."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedtp_flwr import compat

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fedtp_flwr"

# folder -> the folders its modules may import ("": the top-level modules config, wire and compat, which both apps
# load; the public-name module sharding.py is the one exception, see below).
ALLOWED = {
    "": {"", "data", "model", "training"},
    "data": {"data"},
    "model": {"model", "data", ""},
    "training": {"training", "model", "data", ""},
    "client": {"client", "training", "model", "data", ""},
    "server": {"server", "training", "model", "data", ""},
    "tools": {"tools", "server", "training", "model", "data", ""},
    "testing": {"testing", "client", "server", "training", "model", "data", ""},
}


def _loaded_by(module: str) -> list[str]:
    """fedtp_flwr modules a fresh interpreter has loaded after importing `module`."""
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fedtp_flwr'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter (~3 s); the static check below runs in the quick tier
def test_the_client_app_loads_no_server_code():
    loaded = _loaded_by("client_app")
    assert "fedtp_flwr.client.app" in loaded
    server_side = [m for m in loaded if m.startswith(("fedtp_flwr.server", "fedtp_flwr.testing", "fedtp_flwr.tools"))
                   or m == "fedtp_flwr.sharding"]
    assert server_side == []


def _imports(path: Path) -> set[str]:
    """fedtp_flwr modules a file imports (absolute, or relative resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(REPO).parent.as_posix().replace("/", ".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("fedtp_flwr")}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def test_imports_between_folders_run_one_way():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if folder == "" and path.name == "sharding.py":
            continue  # the public-name module: re-exports the plan (model) and the merge (server)
        allowed = ALLOWED.get(folder, set())
        for module in _imports(path):
            if _folder(module) not in allowed:
                bad.append(f"{rel} imports {module}")
    assert bad == []


def test_a_planted_server_import_in_the_model_folder_is_caught():
    """The arrow check above can fail: a model module that imports the server's merge is reported."""
    planted = PACKAGE / "model" / "_planted_for_test.py"
    planted.write_text("from fedtp_flwr.server.aggregation import merge\n", encoding="utf-8")
    try:
        with pytest.raises(AssertionError, match="_planted_for_test.py imports fedtp_flwr.server.aggregation"):
            test_imports_between_folders_run_one_way()
    finally:
        planted.unlink()


@pytest.mark.slow
def test_the_fab_holds_what_the_apps_import_and_no_test_support():
    with zipfile.ZipFile(io.BytesIO(compat.build_fab(REPO))) as fab:
        names = set(fab.namelist())
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/", "fedtp_flwr/testing/",
                                                  "fedtp_flwr/tools/"))]
    needed = set(_loaded_by("server_app")) | set(_loaded_by("client_app"))
    files = {m.replace(".", "/") + ("/__init__.py" if (REPO / m.replace(".", "/")).is_dir() else ".py") for m in needed}
    assert sorted(files - names) == []
    assert {"server_app.py", "client_app.py", "pyproject.toml"} <= names
    assert any(n.startswith("fedtp_flwr/data/corpus/train/") for n in names)  # the built-in corpus
