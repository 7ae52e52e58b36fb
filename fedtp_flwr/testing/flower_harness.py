"""Runs a Flower 1.42 app for real, simulation and deployment, for the tests and the benchmarks.

It lives in the package (not in tests/) so that bench/ scripts import the package only; the app itself
never imports it.

Two entry points:

* :func:`run_simulation` -- ``flwr run <app> --stream`` against a private, lazily started
  local SuperLink (simulation runtime, Ray backend), then ``flwr ls`` for the final status
  and ``flwr log --show`` for the log, then tears everything down.
* :class:`Deployment` -- a context manager that starts ``flower-superlink`` and N
  ``flower-supernode`` processes on loopback (optionally with TLS and SuperNode
  authentication), writes a private CLI ``config.toml`` and submits runs with
  ``flwr run <app> <connection> --stream``.

Isolation and cleanup
---------------------
Every process the harness starts gets ``FEDTP_HARNESS_TAG=<unique id>`` in its environment.
Flower starts detached children (``start_new_session=True``: SuperExec, ``flwr-serverapp``,
``flwr-simulation``, ``flwr-clientapp``) and Ray starts ``raylet``/``gcs_server``/workers,
so a process-group kill is not enough; instead teardown scans ``/proc/*/environ`` for the tag
(every descendant inherits it), sends SIGTERM, waits, then SIGKILLs the stragglers and
checks that none remains. Each harness object uses its own ``FLWR_HOME``, its own
``RAY_TMPDIR`` (removed afterwards) and free loopback ports.

Flower 1.42 facts this relies on (checked against the installed flwr)
--------------------------------------------------------------------
* ``flwr run [APP] [SUPERLINK] [--run-config ...] [--federation-config ...] [--stream]``:
  the 2nd positional is a *SuperLink connection* name from ``$FLWR_HOME/config.toml``
  (``[superlink] default = ...`` / ``[superlink.<name>] address = ...``), not a
  pyproject federation. ``address = ":local:"`` means "start a local simulation SuperLink
  on 127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (default 39091) if none answers
  there". ``--federation`` takes a federation *id* ``@account/name`` (not needed here).
* ``--run-config`` takes ``'k=v k2="s"'`` (regex-split: no spaces/lists in values) or one
  ``.toml`` file path; the harness writes a TOML file. ``--federation-config`` takes
  ``num-supernodes``, ``backend``, ``client-resources-num-cpus``/``-num-gpus``,
  ``init-args-num-cpus``/``-num-gpus``, ``verbose`` ...
* ``[tool.flwr.federations]`` in an app's pyproject.toml is "migrated" by ``flwr run``:
  copied to ``$FLWR_HOME/config.toml`` and *commented out in the pyproject.toml*.
* ``flwr run --stream`` exits 0 even when the run failed; ``flwr ls --run-id ID --format
  json`` gives ``runs[0].status`` (``finished:completed|failed|stopped``) and
  ``status-details`` (e.g. "Simulation failed with exception: ...").

Only the standard library plus ``cryptography`` (a dependency of flwr) and ``tomli_w``
(idem) are used.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

try:  # Python >= 3.11
    import tomllib as _toml_reader
except ModuleNotFoundError:  # pragma: no cover
    import tomli as _toml_reader  # type: ignore[no-redef]

__all__ = [
    "TAG_ENV",
    "PROCESS_PATTERNS",
    "RunResult",
    "HarnessError",
    "ManagedProcess",
    "Deployment",
    "run_simulation",
    "free_port",
    "find_tagged_processes",
    "terminate_tagged",
    "flower_processes",
    "processes_with_env",
    "make_tls_certificates",
    "make_node_keypair",
    "strip_ansi",
    "check_run_config_keys",
    "listening_sockets",
    "ListenerMonitor",
    "toml_value",
]

TAG_ENV = "FEDTP_HARNESS_TAG"
ROLE_ENV = "FEDTP_HARNESS_ROLE"
FINISHED_COMPLETED = "finished:completed"

#: ``pgrep -f`` patterns of processes Flower (and Ray under it) starts.
PROCESS_PATTERNS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "flwr-simulation",
    "raylet",
    "gcs_server",
    "ray::",
    "site-packages/ray/",  # gcs_server, raylet, default_worker.py, agents, monitors
    "bin/flwr ",  # the CLI itself (`flwr run --stream`, `flwr ls` ...)
)

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
# Ports below the kernel's ephemeral range, so that a port we pick is not handed out by
# the kernel to some outgoing connection (Ray opens many) between our check and its use.
_PORT_RANGE = (20000, 32000)


class HarnessError(RuntimeError):
    """The harness could not set up or drive Flower (not: the run failed)."""


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------
def strip_ansi(text: str) -> str:
    """Remove ANSI colour codes (Flower's logger colours its output)."""
    return _ANSI_RE.sub("", text)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now.

    Picked at random below the ephemeral range (20000-32000) and checked by binding it,
    which makes collisions with parallel workers and with kernel-assigned ports unlikely.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise HarnessError("no free port found")


def toml_value(value: Any) -> str:
    """Render a Python scalar as a TOML value (for ``k=v`` CLI overrides)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Path):
        return json.dumps(str(value))
    raise TypeError(f"unsupported config value {value!r} ({type(value).__name__})")


def _kv_string(config: Mapping[str, Any] | str | None) -> str | None:
    if config is None or isinstance(config, str):
        return config
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _check_app_dir(app_dir: Path) -> None:
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise HarnessError(f"{pyproject} not found")
    with pyproject.open("rb") as fh:
        data = _toml_reader.load(fh)
    if "federations" in data.get("tool", {}).get("flwr", {}):
        # `flwr run` would "migrate" it: copy it into $FLWR_HOME/config.toml and comment
        # the section out in the app's pyproject.toml, i.e. edit the source tree.
        raise HarnessError(
            f"{pyproject} has a [tool.flwr.federations] section; Flower 1.42 rewrites "
            "pyproject.toml when it sees one. Remove it: connections live in "
            "$FLWR_HOME/config.toml now."
        )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, val in data.items():
        name = f"{prefix}{key}"
        if isinstance(val, Mapping):
            flat.update(_flatten(val, f"{name}."))
        else:
            flat[name] = val
    return flat


def check_run_config_keys(app_dir: Path | str, run_config: Mapping[str, Any]) -> None:
    """Raise if ``run_config`` has keys that ``[tool.flwr.app.config]`` lacks.

    Flower only answers "[code: 15] Invalid run configuration." without naming the key.
    """
    with (Path(app_dir) / "pyproject.toml").open("rb") as fh:
        data = _toml_reader.load(fh)
    known = _flatten(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    unknown = sorted(set(_flatten(run_config)) - set(known))
    if unknown:
        raise HarnessError(
            f"run_config keys not in [tool.flwr.app.config] of {app_dir}: {unknown}; "
            f"known keys: {sorted(known)}"
        )


def _base_env(tag: str, role: str, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "FLWR_HOME"):
        env.pop(var, None)
    env.update(
        {
            TAG_ENV: tag,
            ROLE_ENV: role,
            "PYTHONUNBUFFERED": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",  # keep every ClientApp print in the run log
        }
    )
    if extra_env:
        env.update({k: str(v) for k, v in extra_env.items()})
    return env


# --------------------------------------------------------------------------------------
# Process bookkeeping
# --------------------------------------------------------------------------------------
def _proc_environ(pid: int) -> dict[bytes, bytes] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    env: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        key, sep, val = item.partition(b"=")
        if sep:
            env[key] = val
    return env


def _proc_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # "pid (comm) S ..." -- comm may contain spaces/parentheses
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("Z", "X")


def processes_with_env(key: str, value: str | None = None) -> dict[int, str]:
    """``{pid: cmdline}`` of live processes whose environment has ``key`` (``=value``)."""
    key_b = key.encode()
    val_b = None if value is None else value.encode()
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        env = _proc_environ(pid)
        if not env or key_b not in env:
            continue
        if val_b is not None and env[key_b] != val_b:
            continue
        if _is_zombie(pid):
            continue
        found[pid] = _proc_cmdline(pid)
    return found


# Tags of harness objects still active -> their private directories.
_TAG_PATHS: dict[str, list[str]] = {}


@atexit.register
def _stop_forgotten() -> None:
    """Last resort (interpreter exit): stop whatever an unclosed harness object left."""
    for tag in list(_TAG_PATHS):
        terminate_tagged(tag, grace_first_s=0, grace_rest_s=3.0)


def find_tagged_processes(tag: str, role: str | None = None) -> dict[int, str]:
    """Live processes started (directly or not) by the harness object with ``tag``.

    Found by the ``FEDTP_HARNESS_TAG`` environment variable every descendant inherits,
    and, as a safety net, by the harness object's private directories (FLWR_HOME,
    RAY_TMPDIR) appearing in a command line.
    """
    procs = processes_with_env(TAG_ENV, tag)
    paths = _TAG_PATHS.get(tag)
    if paths and role is None:
        for pid, cmd in flower_processes().items():
            if pid not in procs and any(p in cmd for p in paths):
                procs[pid] = cmd
    if role is None:
        return procs
    role_b = role.encode()
    return {
        pid: cmd
        for pid, cmd in procs.items()
        if (_proc_environ(pid) or {}).get(ROLE_ENV.encode()) == role_b
    }


def _ere_escape(text: str) -> str:
    """Escape for POSIX extended regular expressions (what pgrep takes)."""
    return re.sub(r"([.\[\]()*+?{}|^$\\])", r"\\\1", text)


def flower_processes() -> dict[int, str]:
    """``{pid: cmdline}`` of every Flower/Ray process on the machine (like ``pgrep -f``)."""
    out = subprocess.run(
        ["pgrep", "-af", "|".join(_ere_escape(p) for p in PROCESS_PATTERNS)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    procs: dict[int, str] = {}
    for line in out.splitlines():
        pid_s, _, cmd = line.partition(" ")
        if pid_s.isdigit() and int(pid_s) != os.getpid() and not _is_zombie(int(pid_s)):
            procs[int(pid_s)] = cmd
    return procs


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(tag: str, pids: Iterable[int] | None, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        alive = find_tagged_processes(tag)
        if pids is not None:
            wanted = set(pids)
            alive = {p: c for p, c in alive.items() if p in wanted}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def terminate_tagged(
    tag: str,
    first: Iterable[int] = (),
    grace_first_s: float = 10.0,
    grace_rest_s: float = 5.0,
) -> dict[int, str]:
    """Stop every process carrying ``tag``; returns what survived SIGKILL (should be {}).

    ``first`` (e.g. the SuperLink) gets SIGTERM alone and ``grace_first_s`` to shut its
    own children down; then everything still tagged gets SIGTERM, then SIGKILL.
    """
    first = [p for p in first if p in find_tagged_processes(tag)]
    if first:
        _signal_pids(first, signal.SIGTERM)
        _wait_gone(tag, first, grace_first_s)
    rest = find_tagged_processes(tag)
    if rest:
        _signal_pids(rest, signal.SIGTERM)
        rest = _wait_gone(tag, None, grace_rest_s)
    if rest:
        _signal_pids(rest, signal.SIGKILL)
        rest = _wait_gone(tag, None, 5.0)
    return rest


_SS_USER_RE = re.compile(r'\("([^"]*)",pid=(\d+)')


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", "0.0.0.0%lo", interface-scoped names
        return False


def listening_sockets() -> list[tuple[str, str, int]]:
    """``(address, process name, pid)`` of every listening TCP socket (``ss -ltnp``)."""
    out = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=False
    ).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        for name, pid in _SS_USER_RE.findall(line):
            found.append((cols[3], name, int(pid)))
    return found


class ListenerMonitor:
    """Samples, in a background thread, the TCP listeners of the processes with ``tag``.

    Used to check that nothing Flower or Ray opens listens beyond 127.0.0.1.
    """

    def __init__(self, tag: str, interval_s: float = 1.0) -> None:
        self.tag = tag
        self.interval_s = interval_s
        self.listeners: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        socks = listening_sockets()
        if not socks:
            return
        ours = find_tagged_processes(self.tag)
        for address, name, pid in socks:
            if pid in ours:
                self.listeners.add((address, name))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # noqa: BLE001 -- best effort, never break a run
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ListenerMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class ManagedProcess:
    """A process the harness started, with stdout+stderr captured in ``log_path``."""

    name: str
    args: list[str]
    popen: subprocess.Popen
    log_path: Path
    home: Path | None = None
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def output(self) -> str:
        """Everything the process wrote so far (ANSI codes removed)."""
        if "final_output" in self.extra:  # the log file was removed with the workdir
            return self.extra["final_output"]
        return strip_ansi(_read_text(self.log_path))

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Wait for exit; returns the exit code, or None if still running."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def _spawn(
    name: str,
    args: list[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path,
) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_fh:
        log_fh.write(f"$ {' '.join(args)}\n".encode())
        log_fh.flush()
        return subprocess.Popen(  # noqa: S603
            args,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# --------------------------------------------------------------------------------------
# Result of one `flwr run`
# --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """Outcome of one ``flwr run``.

    ``status`` is the run's final status from ``flwr ls`` (``finished:completed``,
    ``finished:failed``, ``finished:stopped``; after a timeout the harness runs
    ``flwr stop`` and reports the status after that, with ``timed_out`` set);
    ``returncode`` is the exit code of ``flwr run --stream``, which is 0 even when the run
    failed, so judge by ``status`` / :attr:`ok`.
    """

    run_id: int | None
    status: str | None
    log_text: str
    returncode: int | None
    stream_text: str = ""
    run_info: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    timed_out: bool = False
    superlink_log: str = ""
    workdir: Path | None = None
    #: ``(address, process name)`` of TCP listeners seen while the run went on
    listeners: set[tuple[str, str]] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.status == FINISHED_COMPLETED

    @property
    def non_loopback_listeners(self) -> list[tuple[str, str]]:
        return sorted(item for item in self.listeners if not _is_loopback(item[0]))

    @property
    def status_details(self) -> str:
        return str(self.run_info.get("status-details", ""))

    def describe(self, tail: int = 4000) -> str:
        return (
            f"run_id={self.run_id} status={self.status} details={self.status_details!r} "
            f"returncode={self.returncode} timed_out={self.timed_out} "
            f"duration={self.duration_s:.1f}s workdir={self.workdir}\n"
            f"--- flwr run output (tail) ---\n{self.stream_text[-tail:]}\n"
            f"--- run log (tail) ---\n{self.log_text[-tail:]}\n"
            f"--- superlink log (tail) ---\n{self.superlink_log[-tail:]}"
        )

    def assert_ok(self) -> RunResult:
        assert self.ok, "Flower run did not complete:\n" + self.describe()
        return self


class _Cli:
    """Runs ``flwr`` CLI commands with a fixed environment."""

    def __init__(self, env: Mapping[str, str], cwd: Path, connection: str | None):
        self.env = dict(env)
        self.cwd = cwd
        self.connection = connection

    def _conn(self) -> list[str]:
        return [self.connection] if self.connection else []

    def call(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(  # noqa: S603
            ["flwr", *args],
            env=self.env,
            cwd=str(self.cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def json(self, args: list[str], timeout: float = 60.0) -> dict[str, Any]:
        res = self.call([*args, "--format", "json"], timeout=timeout)
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError as err:
            raise HarnessError(
                f"flwr {' '.join(args)} gave no JSON (rc={res.returncode}):\n"
                f"{res.stdout}\n{res.stderr}"
            ) from err

    def run_info(self, run_id: int) -> dict[str, Any]:
        data = self.json(["ls", *self._conn(), "--run-id", str(run_id)])
        runs = data.get("runs") or []
        if not data.get("success") or not runs:
            raise HarnessError(f"flwr ls --run-id {run_id}: {data}")
        return runs[0]

    def final_run_info(self, run_id: int, wait_s: float) -> dict[str, Any]:
        """``flwr ls`` until the status is ``finished:*`` or ``wait_s`` passed."""
        deadline = time.monotonic() + wait_s
        while True:
            info = self.run_info(run_id)
            if str(info.get("status", "")).startswith("finished") or (
                time.monotonic() >= deadline
            ):
                return info
            time.sleep(0.5)

    def log_show(self, run_id: int) -> str:
        res = self.call(["log", str(run_id), *self._conn(), "--show"], timeout=60)
        return strip_ansi(res.stdout + res.stderr)

    def stop(self, run_id: int) -> None:
        self.call(["stop", str(run_id), *self._conn()], timeout=30)

    def flwr_run(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any] | str | Path | None,
        federation_config: Mapping[str, Any] | None,
        workdir: Path,
        timeout_s: float,
        output_name: str,
        monitor_tag: str | None = None,
    ) -> RunResult:
        """``flwr run <app> [conn] --stream``, then status (``flwr ls``) and log.

        With ``monitor_tag``, the listeners of the processes with that tag are sampled
        while the run goes on (``RunResult.listeners``).
        """
        app_dir = Path(app_dir).resolve()
        _check_app_dir(app_dir)
        args = ["flwr", "run", str(app_dir), *self._conn(), "--stream"]
        if isinstance(run_config, Mapping):
            check_run_config_keys(app_dir, run_config)
        if run_config:
            if isinstance(run_config, (str, Path)) and str(run_config).endswith(".toml"):
                cfg_path = Path(run_config)
            elif isinstance(run_config, str):
                cfg_path = None
                args += ["--run-config", run_config]
            else:
                # A TOML file avoids the quoting limits of 'k=v' (lists, spaces, quotes).
                cfg_path = workdir / f"{output_name}-run-config.toml"
                cfg_path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            if cfg_path is not None:
                args += ["--run-config", str(cfg_path)]
        fed = _kv_string(federation_config)
        if fed:
            args += ["--federation-config", fed]
        out_path = workdir / f"{output_name}.out"
        start = time.monotonic()
        monitor = ListenerMonitor(monitor_tag) if monitor_tag else None
        if monitor:
            monitor.__enter__()
        try:
            proc = _spawn("flwr-run", args, self.env, out_path, self.cwd)
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        finally:
            if monitor:
                monitor.__exit__(None, None, None)
        stream_text = strip_ansi(_read_text(out_path))
        match = _RUN_ID_RE.search(stream_text)
        run_id = int(match.group(1)) if match else None
        info: dict[str, Any] = {}
        log_text = ""
        if run_id is not None:
            try:
                info = self.final_run_info(run_id, wait_s=0 if timed_out else 15)
                if timed_out and not str(info.get("status", "")).startswith("finished"):
                    # Stop it (so `flwr log` ends too) and report the status after that,
                    # normally "finished:stopped"; `timed_out` records what happened.
                    self.stop(run_id)
                    info = self.final_run_info(run_id, wait_s=15)
                log_text = self.log_show(run_id)
            except (HarnessError, subprocess.TimeoutExpired) as err:
                log_text = f"<harness: could not query run {run_id}: {err}>"
        return RunResult(
            run_id=run_id,
            status=info.get("status"),
            log_text=log_text or stream_text,
            returncode=returncode,
            stream_text=stream_text,
            run_info=info,
            duration_s=time.monotonic() - start,
            timed_out=timed_out,
            workdir=workdir,
            listeners=monitor.listeners if monitor else set(),
        )


def _new_workdir(workdir: Path | str | None, prefix: str) -> tuple[Path, bool]:
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve(), False
    return Path(tempfile.mkdtemp(prefix=prefix)).resolve(), True


def _short_tmpdir(prefix: str) -> Path:
    # Ray puts unix sockets under $RAY_TMPDIR/ray/session_<date>_<pid>/sockets/, and a
    # socket path must stay under 107 bytes: keep this one short (not pytest's tmp_path).
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------
def run_simulation(
    app_dir: Path | str,
    run_config: Mapping[str, Any] | str | Path | None = None,
    num_supernodes: int = 2,
    timeout_s: float = 300.0,
    extra_env: Mapping[str, str] | None = None,
    federation_config: Mapping[str, Any] | None = None,
    client_cpus: float | None = None,
    client_gpus: float | None = None,
    workdir: Path | str | None = None,
    keep_workdir: bool = False,
    monitor_listeners: bool = True,
) -> RunResult:
    """Run ``app_dir`` in a private local simulation and return its outcome.

    ``run_config`` overrides ``[tool.flwr.app.config]`` (dict -> TOML file, or a
    ``'k=v ...'`` string, or a path to a ``.toml`` file); keys must already exist there.
    ``federation_config`` adds ``--federation-config`` keys (``backend``,
    ``client-resources-num-cpus``, ``client-resources-num-gpus``, ``init-args-num-cpus``,
    ``init-args-num-gpus``, ``verbose`` ...); ``num_supernodes``/``client_cpus``/
    ``client_gpus`` are shortcuts for three of them. Flower's default is 2 CPUs per
    client, which serialises clients on a 2-core machine.

    The local SuperLink ``flwr`` starts in the background (plus its SuperExec,
    ``flwr-simulation`` and Ray) is always stopped before this returns. ``workdir``
    (default: a fresh temp dir, deleted unless ``keep_workdir``) holds FLWR_HOME and the
    outputs; ``RunResult.superlink_log`` has the SuperLink's own log.
    ``RunResult.listeners`` lists the TCP listeners seen (``monitor_listeners``); check
    ``RunResult.non_loopback_listeners == []``.
    """
    app_dir = Path(app_dir).resolve()
    wd, created = _new_workdir(workdir, "flh-sim-")
    home = wd / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
        encoding="utf-8",
    )
    ray_tmp = _short_tmpdir("flhray-")
    tag = f"sim-{uuid.uuid4().hex[:12]}"
    _TAG_PATHS[tag] = [str(home), str(ray_tmp)]
    fed: dict[str, Any] = {"num-supernodes": int(num_supernodes)}
    if client_cpus is not None:
        fed["client-resources-num-cpus"] = client_cpus
    if client_gpus is not None:
        fed["client-resources-num-gpus"] = client_gpus
    fed.update(federation_config or {})

    result: RunResult | None = None
    try:
        for attempt in range(3):
            env = _base_env(tag, "simulation", extra_env)
            env.update(
                {
                    "FLWR_HOME": str(home),
                    "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                    # Deprecated (not bound in 1.42) but still passed by `flwr`.
                    "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
                    "RAY_TMPDIR": str(ray_tmp),
                }
            )
            cli = _Cli(env, cwd=wd, connection=None)
            result = cli.flwr_run(
                app_dir,
                run_config,
                fed,
                wd,
                timeout_s,
                f"flwr-run-{attempt}",
                monitor_tag=tag if monitor_listeners else None,
            )
            if result.run_id is None and "Failed to start local SuperLink" in (
                result.stream_text
            ):
                # Port race with another worker: stop what we started and retry.
                terminate_tagged(tag)
                continue
            break
    finally:
        superlink_pids = [
            pid for pid, cmd in find_tagged_processes(tag).items() if "flower-superlink" in cmd
        ]
        survivors = terminate_tagged(tag, first=superlink_pids)
        superlink_log = strip_ansi(
            _read_text(home / "local-superlink" / "superlink.log")
        )
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if created and not keep_workdir:
            shutil.rmtree(wd, ignore_errors=True)
        _TAG_PATHS.pop(tag, None)
        if survivors:
            raise HarnessError(f"processes survived SIGKILL: {survivors}")
    assert result is not None
    result.superlink_log = superlink_log
    if created and not keep_workdir:
        result.workdir = None
    return result


# --------------------------------------------------------------------------------------
# TLS certificates and SuperNode keys
# --------------------------------------------------------------------------------------
@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_certificates(directory: Path | str) -> TlsFiles:
    """A self-signed CA and a server certificate (SAN IP:127.0.0.1, DNS:localhost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(minutes=5)
    not_after = now + _dt.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtp-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        srv_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.server_key.chmod(0o600)
    return files


def make_node_keypair(directory: Path | str, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384
    -N ""`` makes): returns ``(private_key_path, public_key_path)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = directory / name
    pub = directory / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return priv, pub


# --------------------------------------------------------------------------------------
# Deployment
# --------------------------------------------------------------------------------------
class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, stopped on exit.

    Example::

        with Deployment(num_supernodes=2, node_configs=[{"partition-id": 0,
                        "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}]
                        ) as dep:
            res = dep.run(app_dir, {"num-server-rounds": 2})
            res.assert_ok()
            assert "TOY-TRAIN" in dep.supernodes[0].output

    ``tls=True`` serves the SuperLink with a throw-away CA/server certificate;
    ``supernode_auth=True`` enables SuperNode authentication: each SuperNode started via
    :meth:`start_supernode` then gets its own key pair, registered first unless
    ``register=False``.
    """

    CONNECTION = "harness"

    def __init__(
        self,
        num_supernodes: int = 0,
        node_configs: list[Mapping[str, Any] | str | None] | None = None,
        tls: bool = False,
        supernode_auth: bool = False,
        workdir: Path | str | None = None,
        keep_workdir: bool = False,
        extra_env: Mapping[str, str] | None = None,
        supernode_env: Mapping[str, str] | None = None,
        superlink_args: list[str] | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if node_configs is not None and len(node_configs) != num_supernodes:
            raise ValueError("node_configs must have num_supernodes entries")
        self.num_supernodes = num_supernodes
        self.node_configs = node_configs
        self.tls = tls
        self.supernode_auth = supernode_auth
        self._workdir_arg = workdir
        self.keep_workdir = keep_workdir
        self.extra_env = dict(extra_env or {})
        self.supernode_env = dict(supernode_env or {})
        self.superlink_args = list(superlink_args or [])
        self.startup_timeout_s = startup_timeout_s
        self.tag = f"dep-{uuid.uuid4().hex[:12]}"
        self.workdir = Path()
        self._created_workdir = False
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.tls_files: TlsFiles | None = None
        self.superlink_port = 0
        self.cli: _Cli | None = None
        self._runs = 0
        self.survivors: dict[int, str] = {}

    # ---- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        survivors = self.close()
        if survivors and exc[0] is None:
            raise HarnessError(f"processes survived SIGKILL: {survivors}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def start(self) -> None:
        self.workdir, self._created_workdir = _new_workdir(self._workdir_arg, "flh-dep-")
        _TAG_PATHS[self.tag] = [str(self.workdir)]
        (self.workdir / "logs").mkdir(exist_ok=True)
        if self.tls:
            self.tls_files = make_tls_certificates(self.workdir / "certs")
        self._start_superlink()
        self._write_cli_config()
        for i in range(self.num_supernodes):
            cfg = self.node_configs[i] if self.node_configs else None
            self.start_supernode(node_config=cfg, wait_online=False)
        if self.num_supernodes:
            self.wait_nodes_online(self.num_supernodes, timeout_s=self.startup_timeout_s)

    def close(self) -> dict[int, str]:
        """SIGTERM SuperNodes and SuperLink (then everything tagged), SIGKILL stragglers.

        Returns the processes that survived (should be empty); logs stay in
        ``<workdir>/logs`` (and in each :class:`ManagedProcess`'s ``output`` while the
        workdir exists).
        """
        node_pids = [n.pid for n in self.supernodes if n.is_running()]
        if node_pids:
            _signal_pids(node_pids, signal.SIGTERM)
            _wait_gone(self.tag, node_pids, 10.0)
        first = [self.superlink.pid] if self.superlink and self.superlink.is_running() else []
        self.survivors = terminate_tagged(self.tag, first=first)
        for proc in [*self.supernodes, *([self.superlink] if self.superlink else [])]:
            proc.wait(timeout=5)  # reap our direct children
        if self._created_workdir and not self.keep_workdir:
            # Keep the text of the logs for assertions after exit.
            for proc in [*self.supernodes, *([self.superlink] if self.superlink else [])]:
                proc.extra["final_output"] = proc.output
            shutil.rmtree(self.workdir, ignore_errors=True)
        _TAG_PATHS.pop(self.tag, None)
        return self.survivors

    # ---- SuperLink ------------------------------------------------------------------
    def _env(self, role: str, home: Path, extra: Mapping[str, str] | None = None) -> dict:
        env = _base_env(self.tag, role, {**self.extra_env, **(extra or {})})
        env["FLWR_HOME"] = str(home)
        # Never let a CLI call fall back to starting a local SuperLink on a shared port.
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
        return env

    def _start_superlink(self) -> None:
        last_error = ""
        for _attempt in range(3):
            port = free_port()
            home = self.workdir / "superlink-home"
            home.mkdir(exist_ok=True)
            args = [
                "flower-superlink",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ]
            if self.tls_files:
                args += [
                    "--ssl-ca-certfile",
                    str(self.tls_files.ca_cert),
                    "--ssl-certfile",
                    str(self.tls_files.server_cert),
                    "--ssl-keyfile",
                    str(self.tls_files.server_key),
                ]
            else:
                args.append("--insecure")
            if self.supernode_auth:
                args.append("--enable-supernode-auth")
            args += self.superlink_args
            log_path = self.workdir / "logs" / "superlink.log"
            popen = _spawn("superlink", args, self._env("superlink", home), log_path, home)
            self.superlink = ManagedProcess("superlink", args, popen, log_path, home, port)
            self.superlink_port = port
            if self._wait_health(self.superlink, self.startup_timeout_s):
                return
            last_error = self.superlink.output[-3000:]
            terminate_tagged(self.tag, first=[popen.pid])
            popen.wait(timeout=5)
        raise HarnessError(f"SuperLink did not become healthy:\n{last_error}")

    def _wait_health(self, proc: ManagedProcess, timeout_s: float) -> bool:
        scheme = "https" if self.tls_files else "http"
        url = f"{scheme}://127.0.0.1:{proc.port}/health"
        ctx = (
            ssl.create_default_context(cafile=str(self.tls_files.ca_cert))
            if self.tls_files
            else None
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.is_running():
                return False
            try:
                with urllib.request.urlopen(url, timeout=1, context=ctx) as resp:  # noqa: S310
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def _write_cli_config(self) -> None:
        home = self.workdir / "cli-home"
        home.mkdir(exist_ok=True)
        conn: dict[str, Any] = {"address": self.address}
        if self.tls_files:
            conn["root-certificates"] = str(self.tls_files.ca_cert)
        else:
            conn["insecure"] = True
        cfg = {"superlink": {"default": self.CONNECTION, self.CONNECTION: conn}}
        (home / "config.toml").write_text(tomli_w.dumps(cfg), encoding="utf-8")
        self.cli = _Cli(self._env("cli", home), cwd=self.workdir, connection=self.CONNECTION)

    # ---- SuperNodes -----------------------------------------------------------------
    def make_node_key(self, name: str) -> tuple[Path, Path]:
        """A fresh ECDSA P-384 OpenSSH key pair under ``<workdir>/keys``."""
        return make_node_keypair(self.workdir / "keys", name)

    def register_node(self, public_key: Path | str) -> dict[str, Any]:
        """``flwr supernode register <pub> <conn>``; returns its JSON answer."""
        assert self.cli is not None
        data = self.cli.json(["supernode", "register", str(public_key), self.CONNECTION])
        if not data.get("success"):
            raise HarnessError(f"supernode register failed: {data}")
        return data

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` (JSON ``nodes`` entries with ``status``)."""
        assert self.cli is not None
        data = self.cli.json(["supernode", "list", self.CONNECTION])
        return list(data.get("nodes") or [])

    def wait_nodes_online(self, n: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` SuperNodes are ``online``."""
        deadline = time.monotonic() + timeout_s
        nodes: list[dict[str, Any]] = []
        dead: list[str] = []
        while time.monotonic() < deadline:
            nodes = self.list_nodes()
            if sum(1 for nd in nodes if nd.get("status") == "online") >= n:
                return nodes
            dead = [sn.name for sn in self.supernodes if not sn.is_running()]
            time.sleep(0.5)
        outputs = "\n".join(f"--- {sn.name} ---\n{sn.output[-2000:]}" for sn in self.supernodes)
        raise HarnessError(
            f"only {nodes!r} after {timeout_s}s (wanted {n} online; exited: {dead})\n"
            f"{outputs}"
        )

    def start_supernode(
        self,
        node_config: Mapping[str, Any] | str | None = None,
        auth_key: Path | str | None = None,
        register: bool = True,
        wait_online: bool = True,
        extra_args: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> ManagedProcess:
        """Start one ``flower-supernode`` (own FLWR_HOME and Runtime API port).

        With ``supernode_auth``: without ``auth_key`` a new key pair is made; it is
        registered first unless ``register=False`` (an unregistered node is refused and
        exits; see :meth:`start_unregistered_supernode`).
        """
        index = len(self.supernodes)
        name = name or f"supernode-{index}"
        # Node ids known before this node (registering creates its id already).
        known = {nd.get("node-id") for nd in self.list_nodes()} if wait_online else set()
        home = self.workdir / f"{name}-home"
        home.mkdir(exist_ok=True)
        port = free_port()
        args = [
            "flower-supernode",
            "--superlink",
            self.address,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if self.tls_files:
            args += ["--root-certificates", str(self.tls_files.ca_cert)]
        else:
            args.append("--insecure")
        cfg = _kv_string(node_config)
        if cfg:
            args += ["--node-config", cfg]
        extra: dict[str, Any] = {}
        if self.supernode_auth or auth_key is not None:
            if auth_key is None:
                priv, pub = self.make_node_key(name)
            else:
                priv = Path(auth_key)
                pub = priv.with_name(priv.name + ".pub")
            if register:
                extra["registration"] = self.register_node(pub)
            args += ["--auth-supernode-private-key", str(priv)]
            extra["private_key"], extra["public_key"] = priv, pub
        args += extra_args or []
        log_path = self.workdir / "logs" / f"{name}.log"
        env = self._env(name, home, {**self.supernode_env, **(extra_env or {})})
        popen = _spawn(name, args, env, log_path, home)
        node = ManagedProcess(name, args, popen, log_path, home, port, extra)
        self.supernodes.append(node)
        if wait_online:
            self._wait_new_node_online(node, known)
        return node

    def _wait_new_node_online(self, node: ManagedProcess, known: set) -> None:
        registered = node.extra.get("registration", {}).get("node-id")
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            fresh = [
                nd
                for nd in self.list_nodes()
                if nd.get("status") == "online"
                and (
                    str(nd.get("node-id")) == str(registered)
                    if registered is not None
                    else nd.get("node-id") not in known
                )
            ]
            if fresh:
                node.extra["node_id"] = fresh[0].get("node-id")
                return
            if not node.is_running():
                break
            time.sleep(0.5)
        raise HarnessError(
            f"{node.name} did not come online (exit code {node.returncode}):\n"
            f"{node.output[-3000:]}"
        )

    def start_unregistered_supernode(
        self, node_config: Mapping[str, Any] | str | None = None, exit_timeout_s: float = 60.0
    ) -> ManagedProcess:
        """Start a SuperNode with a key that was never registered; wait for it to exit.

        Flower 1.42 refuses it at once: the process logs "Exit Code: 305 ... [code: 2004]
        Failed to activate SuperNode." and exits with OS status 1 (``flwr_exit`` maps
        every error code to 1). ``returncode`` is None if it did not exit in time.
        """
        name = f"unregistered-{len(self.supernodes)}"
        key, _pub = self.make_node_key(name)
        node = self.start_supernode(
            node_config=node_config,
            auth_key=key,
            register=False,
            wait_online=False,
            name=name,
        )
        node.wait(exit_timeout_s)
        return node

    def _node(self, index_or_node: int | ManagedProcess) -> ManagedProcess:
        if isinstance(index_or_node, ManagedProcess):
            return index_or_node
        return self.supernodes[index_or_node]

    def signal_clientapps(self, i: int | ManagedProcess, sig: int) -> list[int]:
        """Send ``sig`` (e.g. SIGSTOP / SIGCONT: a node that pauses mid-training) to SuperNode ``i``'s
        ClientApp processes; -> their pids."""
        node = self._node(i)
        pids = [pid for pid, cmd in find_tagged_processes(self.tag, role=node.name).items() if "flwr-clientapp" in cmd]
        _signal_pids(set(pids), sig)
        return pids

    def kill_supernode(self, i: int | ManagedProcess, whole_tree: bool = True) -> None:
        """SIGKILL SuperNode ``i`` (by default with its SuperExec and ClientApp
        processes too, like a crashed machine)."""
        node = self._node(i)
        pids = [node.pid]
        if whole_tree:
            pids += list(find_tagged_processes(self.tag, role=node.name))
        _signal_pids(set(pids), signal.SIGKILL)
        node.wait(10)
        _wait_gone(self.tag, pids, 10.0)

    # ---- runs -----------------------------------------------------------------------

    def run(
        self,
        app_dir: Path | str,
        run_config: Mapping[str, Any] | str | Path | None = None,
        timeout_s: float = 300.0,
        monitor_listeners: bool = True,
    ) -> RunResult:
        """``flwr run <app_dir> harness --stream``, then ``flwr ls``/``flwr log``.

        On timeout the run is stopped with ``flwr stop`` and ``timed_out`` is set.
        ClientApp output/tracebacks are in the SuperNodes' ``output``, not in the log.
        """
        assert self.cli is not None, "Deployment not started"
        self._runs += 1
        result = self.cli.flwr_run(
            Path(app_dir),
            run_config,
            None,
            self.workdir,
            timeout_s,
            f"flwr-run-{self._runs}",
            monitor_tag=self.tag if monitor_listeners else None,
        )
        if self.superlink is not None:
            result.superlink_log = self.superlink.output
        return result

    def output(self, name: str) -> str:
        """Captured output of ``"superlink"`` or a SuperNode by name."""
        for proc in [self.superlink, *self.supernodes]:
            if proc is not None and proc.name == name:
                return proc.output
        raise KeyError(name)
