"""docs/deployment.md is run as written: a newcomer's commands fail this test before they fail a user.

Convention: every ```bash block of the guide is preceded by ``<!-- doc-test: ROLE -->`` naming what it does
(``<!-- doc-test: skip: reason -->`` for the few that cannot run here: package installs, 3B weights). The slow
test runs the blocks with bash, in a temp dir, on loopback, each "machine" with its own HOME and working
directory: the server (also the operator, as the guide allows) in a copy of the checkout, a client machine
with two SuperNodes, and a third machine whose key was never registered. Only host names, ports, the
/srv/fedtp and /data paths, the <run-id> a previous command printed and the <node-name> of the key being
registered are substituted (`substitute`). A command is judged by its output, not only its exit status:
`flwr supernode register` and `flwr run --stream` exit 0 when they fail. Every process the test starts carries
a tag in its environment and is stopped in a `finally` (fedtp_flwr/testing/flower_harness.py's
terminate_tagged), also when a step fails. The guide keeps everything it writes out of the checkout (the
SuperLink works in /srv/fedtp, keys and the CA certificate live in ~/.fedtp): the operator's copy of the checkout
must hold exactly the files it started with when the guide is done.

The README's "Deployment in brief" block is checked (quick tier) to hold only commands that the guide's tested
blocks contain, so it cannot drift from what runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedtp_flwr.server.outputs import read_results
from fedtp_flwr.testing import flower_harness as fh

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

APP_DIR = Path(__file__).resolve().parents[1]
GUIDE = APP_DIR / "docs" / "deployment.md"
README = APP_DIR / "README.md"

MARKER_RE = re.compile(r"<!-- doc-test: ([\w-]+)(?::\s*(.*?))? -->\n```bash\n(.*?)\n```", re.S)
FENCE_RE = re.compile(r"^```bash$", re.M)
#: The roles the slow test runs, each exactly once in the guide.
RUN_ROLES = {"certs", "superlink", "superlink-ready", "cli-config", "node-key", "register", "node-data", "supernode",
             "second-node-key", "second-supernode", "nodes-online", "first-run", "run-status", "submit-run",
             "stop-run", "stop-clientapps", "stop-superlink"}
RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


def guide_blocks(text: str) -> tuple[dict[str, str], list[str]]:
    """(role -> the block's code, the skip reasons) of the marked ```bash blocks; an unmarked block is an error."""
    blocks: dict[str, str] = {}
    skipped: list[str] = []
    for m in MARKER_RE.finditer(text):
        role, reason, code = m.groups()
        if role == "skip":
            assert reason, f"{GUIDE}:{text[:m.start()].count(chr(10)) + 1}: a skipped block must say why"
            skipped.append(reason)
            continue
        assert role not in blocks, f"{GUIDE}: two blocks with the role {role!r}"
        blocks[role] = code
    n_fences = len(FENCE_RE.findall(text))
    assert n_fences == len(blocks) + len(skipped), (
        f"{GUIDE}: {n_fences} ```bash blocks but {len(blocks) + len(skipped)} doc-test markers: every shell "
        "block needs <!-- doc-test: ROLE --> (or <!-- doc-test: skip: reason -->) on the line above it")
    return blocks, skipped


def commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, trailing comments and extra spaces removed."""
    out = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        quote = ""
        for i, ch in enumerate(line):  # cut a comment: a '#' after a blank, outside quotes
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1].isspace()):
                line = line[:i]
                break
        if line.strip():
            out.append(" ".join(line.split()))
    return out


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Deployment in brief")
    section = text[start:text.index("\n## ", start + 1)]
    (code,) = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    return code


# ----------------------------------------------------------------------------------------------- quick tier

def test_every_shell_block_of_the_guide_is_marked_and_each_role_is_there() -> None:
    blocks, skipped = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    assert set(blocks) == RUN_ROLES, f"unknown: {set(blocks) - RUN_ROLES}, missing: {RUN_ROLES - set(blocks)}"
    assert len(skipped) <= 3, skipped  # the untested part stays small


def test_readme_deployment_commands_are_commands_the_guide_test_runs() -> None:
    blocks, _ = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    tested = [cmd for code in blocks.values() for cmd in commands(code)]
    readme = commands(readme_block())
    assert len(readme) >= 5, readme
    for cmd in readme:
        assert any(cmd in t for t in tested), (
            f"{README} 'Deployment in brief' command not in a tested block of {GUIDE}:\n  {cmd}")


# ----------------------------------------------------------------------------------------------- slow tier

@dataclass
class Machine:
    """One machine of the guide: its home directory (``~``), working directory and ports (guide -> real)."""

    name: str
    home: Path
    cwd: Path
    ports: dict[int, int] = field(default_factory=dict)


class GuideRunner:
    """Runs the guide's blocks as written, with only host names, ports and paths substituted."""

    def __init__(self, root: Path, blocks: dict[str, str]) -> None:
        self.root = root
        self.blocks = blocks
        self.tag = f"doc-{uuid.uuid4().hex[:12]}"
        self.background: dict[str, fh.ManagedProcess] = {}
        self.bin_dir = Path(sys.executable).parent  # flwr, flower-superlink ... of this Python (no pyenv shims)

    def substitute(self, code: str, machine: Machine, run_id: int | None = None, node: str | None = None) -> str:
        code = code.replace("superlink.example.org", "localhost").replace("203.0.113.10", "127.0.0.1")
        code = code.replace("0.0.0.0", "127.0.0.1")
        for old, new in machine.ports.items():
            code = re.sub(rf"(?<!\d){old}(?!\d)", str(new), code)
        code = re.sub(r"(?<![\w/.-])/data/", f"{self.root}/data/", code)
        code = re.sub(r"(?<![\w/.-])/srv/fedtp", f"{self.root}/srv/fedtp", code)
        if run_id is not None:
            code = code.replace("<run-id>", str(run_id))
        if node is not None:
            code = code.replace("<node-name>", node)
        left = [cmd for cmd in commands(code) if re.search(r"<[a-z-]+>", cmd)]
        assert not left, f"a placeholder is left: {left}"
        return code

    def env(self, machine: Machine) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("FLWR_HOME", "RAY_ADDRESS", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")}
        env.update({
            "HOME": str(machine.home), fh.TAG_ENV: self.tag, fh.ROLE_ENV: machine.name,
            "PATH": f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            # a CLI mistake must not start a local SuperLink on the machine-wide default port
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(fh.free_port()),
        })
        return env

    def run(self, role: str, machine: Machine, run_id: int | None = None, timeout: float = 120,
            quiet: bool = False, node: str | None = None) -> tuple[int, str]:
        """Run a block in the foreground -> (exit status, stdout + stderr)."""
        code = self.substitute(self.blocks[role], machine, run_id, node)
        t0 = time.monotonic()
        res = subprocess.run(["bash", "-c", code], cwd=machine.cwd, env=self.env(machine), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if not quiet:
            print(f"doc-test {role} on {machine.name}: exit {res.returncode}, {time.monotonic() - t0:.1f} s")
        return res.returncode, fh.strip_ansi(res.stdout + res.stderr)

    def start(self, role: str, machine: Machine, name: str) -> fh.ManagedProcess:
        """Start a long-running block (SuperLink, SuperNode) in the background, its output in a log file."""
        code = self.substitute(self.blocks[role], machine)
        log_path = self.root / "logs" / f"{name}.log"
        popen = fh._spawn(name, ["bash", "-c", code], self.env(machine), log_path, machine.cwd)
        proc = fh.ManagedProcess(name, ["bash", "-c", code], popen, log_path, machine.cwd)
        self.background[name] = proc
        print(f"doc-test {role} on {machine.name}: started as {name}")
        return proc

    def poll(self, role: str, machine: Machine, ok, what: str, timeout: float = 90,
             run_id: int | None = None) -> str:
        """Run a block until ``ok(output)``; fail with the last output and the background logs."""
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.run(role, machine, run_id, quiet=True)
            if ok(out):
                print(f"doc-test {role} on {machine.name}: {what}")
                return out
            if time.monotonic() > deadline:
                pytest.fail(f"{role} on {machine.name}: not {what} within {timeout} s (exit {rc}):\n{out}\n"
                            + self.logs())
            time.sleep(1)

    def logs(self, tail: int = 3000) -> str:
        return "".join(f"\n--- {name} ---\n{p.output[-tail:]}" for name, p in self.background.items())

    def stop_all(self) -> dict[int, str]:
        """Ctrl-C's equivalent for the SuperNodes, then the SuperLink, then whatever is left (SIGKILL last)."""
        procs = fh.find_tagged_processes(self.tag)
        nodes = [pid for pid, cmd in procs.items() if "flower-supernode" in cmd]
        links = [pid for pid, cmd in procs.items() if "flower-superlink" in cmd]
        fh._signal_pids(nodes, signal.SIGTERM)
        fh._wait_gone(self.tag, nodes, 10.0)
        survivors = fh.terminate_tagged(self.tag, first=links)
        for proc in self.background.values():
            proc.wait(timeout=5)
        return survivors


def copy_checkout(dest: Path) -> None:
    """The files of the working tree that git tracks or would track (what a fresh clone plus local edits has)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=APP_DIR, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = APP_DIR / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not fh._is_zombie(pid)


def node_statuses(out: str) -> dict[int, str]:
    return {int(n["node-id"]): n.get("status") for n in json.loads(out).get("nodes") or []}


def clientapps(tag: str) -> dict[int, str]:
    return {pid: cmd for pid, cmd in fh.find_tagged_processes(tag).items() if "flwr-clientapp" in cmd}


def first_run(g: GuideRunner, server: Machine) -> tuple[int, str]:
    """The guide's first run, and its status and log once it has finished: (run id, output)."""
    rc, out = g.run("first-run", server, timeout=300)
    m = RUN_ID_RE.search(out)
    assert m, out[-3000:]
    run_id = int(m.group(1))
    return run_id, g.poll("run-status", server, lambda out: '"finished:' in out, "finished", timeout=60, run_id=run_id)


@pytest.mark.slow
def test_the_deployment_guide_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("flwr", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the flwr CLI is not installed next to this Python")
    for tool in ("openssl", "ssh-keygen", "curl", "pkill", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    blocks, _ = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    root = tmp_path
    server = Machine("server", root / "server-home", root / "server", {8000: fh.free_port()})
    client = Machine("client-a", root / "client-a-home", root / "client-a",
                     {8000: server.ports[8000], 9094: fh.free_port(), 9095: fh.free_port()})
    intruder = Machine("client-c", root / "client-c-home", root / "client-c",
                       {8000: server.ports[8000], 9094: fh.free_port()})
    for m in (server, client, intruder):
        m.home.mkdir(parents=True)
        m.cwd.mkdir(parents=True)
    copy_checkout(server.cwd)
    checkout_files = files_under(server.cwd)
    srv = root / "srv" / "fedtp"  # the guide's /srv/fedtp

    g = GuideRunner(root, blocks)
    fh._TAG_PATHS[g.tag] = [str(root)]  # the harness's atexit net stops them even if this process dies
    try:
        # 2. certificates (server, in /srv/fedtp), 3. SuperLink in the background, its pid recorded, ready
        rc, out = g.run("certs", server)
        assert rc == 0 and "certs/server.pem: OK" in out, out
        assert (srv / "certs" / "ca.key").is_file() and not (server.cwd / "certs").exists()
        rc, out = g.run("superlink", server)
        assert rc == 0, out
        superlink_pid = int((srv / "superlink.pid").read_text())
        g.poll("superlink-ready", server, lambda out: "SuperLink is up" in out, "up", timeout=60)
        assert is_alive(superlink_pid) and "flower-superlink" in fh._proc_cmdline(superlink_pid)

        # 4. the operator's connection (the operator works on the server, in the checkout)
        rc, out = g.run("cli-config", server)
        assert rc == 0 and "prod" in out and "local" in out, out

        # ca.crt goes to ~/.fedtp on every client machine and the operator's (here the server's)
        for m in (server, client, intruder):
            (m.home / ".fedtp").mkdir(parents=True, exist_ok=True)
            shutil.copy2(srv / "certs" / "ca.crt", m.home / ".fedtp" / "ca.crt")

        # 5. keys: two on the client machine, one on a machine whose key nobody registers
        for role, m in (("node-key", client), ("second-node-key", client), ("node-key", intruder)):
            rc, out = g.run(role, m)
            assert rc == 0, out
        registered = []
        for name in ("client-a", "client-b"):  # "send ~/.fedtp/<name>-key.pub to the operator"
            (server.home / ".fedtp" / "node-keys").mkdir(parents=True, exist_ok=True)
            shutil.copy2(client.home / ".fedtp" / f"{name}-key.pub",
                         server.home / ".fedtp" / "node-keys" / f"{name}-key.pub")
            rc, out = g.run("register", server, node=name)
            assert rc == 0 and '"success": true' in out, out
            registered.append(int(json.loads(out)["node-id"]))
        assert len(set(registered)) == 2, registered  # two keys, two nodes: neither file replaced the other

        # 6. the nodes' data (the guide makes it), SuperNodes; the unregistered one is refused and named in the
        # SuperLink's own log
        rc, out = g.run("node-data", client)
        assert rc == 0 and [len((root / "data" / f"client-{x}.jsonl").read_text().splitlines()) for x in "ab"] \
            == [300, 200], out
        g.start("supernode", client, "supernode-a")
        g.start("second-supernode", client, "supernode-b")
        refused = g.start("supernode", intruder, "supernode-unregistered")
        assert refused.wait(60) is not None, refused.output[-3000:]
        assert "Failed to activate SuperNode" in refused.output, refused.output[-3000:]
        assert "SuperNode ID" not in refused.output
        refusal = re.compile(r"activate-node.*No SuperNode found with the given public key")
        superlink_log = srv / "superlink.log"  # the log the guide names
        deadline = time.monotonic() + 10
        while not refusal.search(superlink_log.read_text()):
            assert time.monotonic() < deadline, superlink_log.read_text()[-3000:]
            time.sleep(0.5)
        g.poll("nodes-online", server,
               lambda out: [node_statuses(out).get(n) for n in registered] == ["online", "online"], "both online")

        # 7. the first run completes, both nodes trained, with its outputs in its own folder; flwr run exits 0
        # whatever happened: read the status and the log's last line
        first, status = first_run(g, server)
        assert re.search(r'"status":\s*"finished:completed"', status), status[-3000:] + g.logs()
        assert "round 1: held-out loss" in status and "round 1: 2 valid replies" in status, status[-3000:]
        assert "fedtp-flwr: 1 of 1 round trained (1: 2 clients)" in status, status[-3000:]
        outputs = srv / "outputs"  # the SuperLink's working directory, not the checkout
        history = next(iter(read_results(outputs / "experiment_results_llama32.pkl").values()))
        assert [r for r, _, _ in history] == [0, 1] and history[-1][1] < history[0][1], history
        run_dir = outputs / f"run-{first}"
        assert len((run_dir / "eval_res_llama32_ws2_r1.txt").read_text().splitlines()) == 2
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pth")) == [
            "llama32_tiny_ws2_lr0.001_best.pth", "llama32_tiny_ws2_lr0.001_round1.pth"]
        for name in ("supernode-a", "supernode-b"):  # each node trained on its own file
            assert re.search(r"round \d: received the rank \d/2 slice: .* training on \w+, \d+ local examples",
                             g.background[name].output), g.background[name].output[-3000:]

        # a longer run, submitted, then stopped while its ClientApps train
        rc, out = g.run("submit-run", server)
        m = RUN_ID_RE.search(out)
        assert m, out[-3000:]
        second = int(m.group(1))
        deadline = time.monotonic() + 180
        while not all(g.background[n].output.count("received the rank") >= 2 for n in ("supernode-a", "supernode-b")):
            assert time.monotonic() < deadline, g.logs()
            time.sleep(0.5)
        rc, out = g.run("stop-run", server, run_id=second)
        assert "successfully stopped" in out, out
        status = g.poll("run-status", server, lambda out: '"finished:' in out, "finished", timeout=60, run_id=second)
        assert re.search(r'"status":\s*"finished:stopped"', status), status[-3000:]
        print(f"ClientApps still running after flwr stop: {len(clientapps(g.tag))}")
        for port in (9094, 9095):  # each SuperNode's ClientApps, named by its --port
            g.run("stop-clientapps", Machine(client.name, client.home, client.cwd,
                                             {9094: client.ports[port]}))
        deadline = time.monotonic() + 20
        while clientapps(g.tag):
            assert time.monotonic() < deadline, f"ClientApps left after stop-clientapps: {clientapps(g.tag)}"
            time.sleep(0.5)
        assert is_alive(superlink_pid) and all(g.background[n].is_running() for n in ("supernode-a", "supernode-b")), \
            g.logs()

        # the nodes take the next run at once (each one's ClientApp answers it); without the data files no node
        # trains: the run ends failed, each node's DataError in its log
        for x in "ab":
            (root / "data" / f"client-{x}.jsonl").rename(root / "data" / f"client-{x}.jsonl.away")
        third, status = first_run(g, server)
        assert re.search(r'"status":\s*"finished:failed"', status), status[-3000:] + g.logs()
        for node in registered:
            dropped = rf"round 1: dropping reply from node {node} \(rank \d\): error reply .*DataError"
            assert re.search(dropped, status), status[-3000:]
        assert "no such file or directory" in status, status[-3000:]
        assert "round 1: 0 valid replies, fewer than min-train-nodes=1" in status, status[-3000:]
        assert not (outputs / f"run-{third}" / "checkpoints").exists()

        # the SuperLink stops by the pid it recorded (no pattern that would stop other SuperLinks), and the
        # operator's checkout holds exactly what it held before the guide ran
        rc, out = g.run("stop-superlink", server)
        assert rc == 0, out
        deadline = time.monotonic() + 30
        while is_alive(superlink_pid):
            assert time.monotonic() < deadline, f"the SuperLink (pid {superlink_pid}) still runs after stop-superlink"
            time.sleep(0.5)
        assert files_under(server.cwd) == checkout_files
    finally:
        survivors = g.stop_all()
        fh._TAG_PATHS.pop(g.tag, None)
    assert survivors == {}


@pytest.mark.slow
def test_register_without_the_connection_fails_with_exit_status_0(tmp_path: Path) -> None:
    """What the guide says next to `flwr supernode register`: without the prod connection (section 4 skipped)
    it fails, says so in its output, and still exits 0, so its output is what to read."""
    blocks, _ = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    g = GuideRunner(tmp_path, blocks)
    operator = Machine("operator", tmp_path / "home", tmp_path / "work")
    operator.home.mkdir()
    operator.cwd.mkdir()
    keys = operator.home / ".fedtp" / "node-keys"
    keys.mkdir(parents=True)
    _, pub = fh.make_node_keypair(keys, "client-a-key")
    assert pub == keys / "client-a-key.pub"
    rc, out = g.run("register", operator, node="client-a")
    assert rc == 0, out
    answer = json.loads(out)
    assert answer["success"] is False and "SuperLink connection 'prod' not found" in answer["error-message"], out
