"""Run a real Flower deployment (SuperLink + SuperNodes + ``flwr`` CLI) on loopback, for tests.

Why a harness: deployment bugs (TLS names, node keys, ports, stuck processes) only show when
the real ``flower-superlink`` / ``flower-supernode`` binaries talk to each other. This module
starts them as separate process groups, with every ``FLWR_HOME`` inside one temporary folder,
free ports chosen by binding port 0, one log file per process, bounded readiness waits, and
a teardown that leaves no process behind (SIGTERM, then SIGKILL, then a sweep for any process
that still carries this harness's marker in its environment).

Facts about flwr 1.42 this relies on (checked against the installed source):

* Fleet, Control and Runtime APIs share one HTTPS port (``--host/--port``); ``GET /health``
  answers 200 once it serves.
* The CLI reads connections from ``$FLWR_HOME/config.toml`` (``[superlink.<name>]`` with
  ``address``, ``root-certificates`` or ``insecure``), not from ``pyproject.toml``.
* ``flwr run <dir>`` *rewrites* ``<dir>/pyproject.toml`` when it holds a legacy
  ``[tool.flwr.federations]`` table (it comments it out), and ``flwr <cmd>`` without a
  connection name does the same to ``./pyproject.toml``. So the app is staged into the temp
  folder (:func:`stage_app`) and the CLI always runs there with an explicit connection name.
* A SuperNode killed with SIGKILL stays "online" until its heartbeat expires (2 x 30 s in
  1.42); restarting it with the same key before that fails with exit code 305 ("could not
  be activated"), so :meth:`Federation.restart_supernode` retries until the link lets it in.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from privatune.pki import PkiPaths, make_trial_pki, write_node_keypair

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER_ENV = "PRIVATUNE_DEPLOY_HARNESS"
ConfigValue = str | int | float | bool

_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_NOT_ACTIVATED = "could not be activated"
#: Readiness bound for one process: generous because a loaded 2-core CI box took 47 s to start a
#: SuperNode (each Flower process imports for seconds); failures still end at this bound, with logs.
READY_TIMEOUT = 120.0
_LIVE: set[Federation] = set()  # strong refs: a forgotten Federation is still torn down at exit


@atexit.register
def _teardown_all() -> None:
    for fed in list(_LIVE):
        fed.teardown()


class HarnessError(RuntimeError):
    """A deployment step failed; the message carries the relevant log tail."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a port the OS just handed out for ``host`` (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _toml_value(key: str, value: ConfigValue) -> str:
    """Format one value the way ``flwr``'s ``key=value`` parser (TOML per pair) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if not isinstance(value, str):
        raise TypeError(f"config key {key!r}: {type(value).__name__} is not str/int/float/bool")
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"  # TOML literal string: backslashes kept as they are
    raise ValueError(f"config key {key!r}: value contains both quote kinds: {value!r}")


def format_config(config: Mapping[str, ConfigValue]) -> str:
    """``{"site-id": "a", "max-epsilon": 8.0}`` -> ``site-id="a" max-epsilon=8.0`` for ``--node-config``/``--run-config``."""
    parts = []
    for key, value in config.items():
        if not key or any(c.isspace() or c == "=" for c in key):
            raise ValueError(f"bad config key {key!r}")
        parts.append(f"{key}={_toml_value(key, value)}")
    return " ".join(parts)


def write_node_config_toml(path: Path | str, config: Mapping[str, ConfigValue]) -> Path:
    """Write a node config as a TOML file; ``flower-supernode --node-config site.toml`` reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {_toml_value(k, v)}\n" for k, v in config.items()), encoding="utf-8")
    return path


def stage_app(src: Path | str, dest: Path | str) -> Path:
    """``privatune app-folder``'s copy of a Flower app (pyproject.toml without legacy federations, packages)."""
    from privatune.cli.app_folder import stage_app as stage

    return stage(Path(src), Path(dest))


def _bin(name: str) -> str:
    """Resolve a Flower executable next to the running interpreter (the project venv) first."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise HarnessError(f"{name} not found next to {sys.executable} nor on PATH: install flwr")
    return found


@dataclass
class ManagedProcess:
    """One long-running Flower process in its own process group, logging to one file."""

    name: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started_at: float
    log_offset: int = 0  # where this start's output begins in a shared (appended) log
    node_id: int | None = None
    ready_s: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Output of this start only (restarts append to the same file)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class RunResult:
    """What ``flwr run ... --stream`` produced, plus the run's final status from ``flwr ls``."""

    returncode: int
    output: str
    wall_s: float
    run_id: int | None
    status: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "finished:completed"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``MARKER_ENV=marker`` (zombies excluded)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


class Federation:
    """A loopback SuperLink with TLS and SuperNode authentication, plus SuperNodes and the CLI.

    Use as a context manager (or call :meth:`teardown`); an ``atexit`` hook also tears down.
    Everything lives under ``root``: ``pki/``, ``superlink/`` (FLWR_HOME + state.db),
    ``cli/config.toml``, ``supernode-<i>/`` and ``logs/<process>.log``.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        tls: bool = True,
        node_auth: bool = True,
        connection: str = "trial",
        proxy: bool = False,
        log: IO[str] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.node_auth = node_auth
        self.connection = connection
        # proxy: the SuperLink stays on loopback and sites dial an nginx that forwards only the Fleet API
        # (server/fleet_proxy.py); the `outside` CLI connection goes through the proxy like an outsider.
        self.proxy = proxy
        self.proxy_port: int | None = None
        self.proxy_process: ManagedProcess | None = None
        self.logs_dir = self.root / "logs"
        self.logs_dir.mkdir(exist_ok=True)
        self.marker = uuid.uuid4().hex
        self.pki: PkiPaths = make_trial_pki(self.root / "pki", 0, overwrite=True)
        self.superlink: ManagedProcess | None = None
        self.superlink_port: int | None = None
        self.supernodes: dict[int, ManagedProcess] = {}
        self.node_configs: dict[int, Mapping[str, ConfigValue] | Path | None] = {}
        self.registered: dict[int, int] = {}  # node index -> node id
        self.timings: dict[str, float] = {}
        self._runs = 0
        self._log = log if log is not None else sys.stderr
        self._closed = False
        _LIVE.add(self)

    # ---------------------------------------------------------------- basics
    def __enter__(self) -> Federation:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            self.print_logs()
        self.teardown()

    @property
    def address(self) -> str:
        if self.superlink_port is None:
            raise HarnessError("SuperLink not started")
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def site_address(self) -> str:
        """What SuperNodes dial: the proxy when there is one, else the SuperLink itself."""
        if self.proxy:
            if self.proxy_port is None:
                raise HarnessError("proxy not started")
            return f"{LOOPBACK}:{self.proxy_port}"
        return self.address

    def env(self, flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of every child: own FLWR_HOME, unbuffered output, no telemetry, the marker."""
        env = dict(os.environ)
        # The SuperLink and SuperNodes spawn flwr-serverapp / flwr-clientapp by name: they must be the
        # project venv's (next to this interpreter), not whatever else is on PATH.
        venv_bin = str(Path(sys.executable).parent)
        env.update(
            {
                "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
                "FLWR_HOME": str(flwr_home),
                "PYTHONUNBUFFERED": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0",
                MARKER_ENV: self.marker,
            }
        )
        if extra:
            env.update(extra)
        return env

    def node_key(self, index: int) -> tuple[Path, Path]:
        """Private and public key of node ``index``, made on first use (OpenSSH, P-384)."""
        private = self.pki.out_dir / "keys" / f"node-{index}"
        public = private.with_name(private.name + ".pub")
        if not private.exists():
            write_node_keypair(private)
        return private, public

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path) -> ManagedProcess:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as fh:
            fh.write(f"\n===== {time.strftime('%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=self.env(flwr_home),
                start_new_session=True,  # own process group: killpg reaches its children too
            )
        return ManagedProcess(name, cmd, log_path, popen, time.monotonic(), offset)

    # ---------------------------------------------------------------- SuperLink
    def start_superlink(self, timeout: float = READY_TIMEOUT, same_port: bool = False) -> ManagedProcess:
        """Start ``flower-superlink`` and wait until ``/health`` answers over (verified) TLS.

        ``same_port`` restarts it where the SuperNodes already dial (its ``--database`` keeps state).
        """
        if self.superlink is not None and self.superlink.alive():
            raise HarnessError("SuperLink already running")
        if not (same_port and self.superlink_port):
            self.superlink_port = free_port()
        home = self.root / "superlink"
        cmd = [_bin("flower-superlink")]
        if self.tls:
            cmd += [
                "--ssl-ca-certfile",
                str(self.pki.ca_cert),
                "--ssl-certfile",
                str(self.pki.server_cert),
                "--ssl-keyfile",
                str(self.pki.server_key),
            ]
        else:
            cmd += ["--insecure"]
        if self.node_auth:
            cmd += ["--enable-supernode-auth"]
        cmd += [
            "--host",
            LOOPBACK,
            "--port",
            str(self.superlink_port),
            "--database",
            str(home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        proc = self._spawn("superlink", cmd, home)
        self.superlink = proc
        self._wait_health(proc, timeout)
        proc.ready_s = time.monotonic() - proc.started_at
        self.timings["superlink_start_s"] = proc.ready_s
        if self.proxy:
            self.start_proxy(timeout)
        self._write_cli_config()
        return proc

    def start_proxy(self, timeout: float = READY_TIMEOUT) -> ManagedProcess:
        """Start nginx in front of the SuperLink (Fleet API only) and wait until /health answers through it."""
        from privatune.server.fleet_proxy import FleetProxy, write_nginx_conf

        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx is None:
            raise HarnessError("nginx is not installed (Debian: apt-get install nginx-light); .ci/run installs it")
        assert self.superlink_port is not None
        if self.proxy_port is None:
            self.proxy_port = free_port()
        prefix = self.root / "proxy"
        conf = write_nginx_conf(
            FleetProxy(
                listen_host=LOOPBACK,
                listen_port=self.proxy_port,
                superlink_host=LOOPBACK,
                superlink_port=self.superlink_port,
                server_cert=self.pki.server_cert,
                server_key=self.pki.server_key,
                ca_cert=self.pki.ca_cert,
                prefix=prefix,
                user="root" if os.geteuid() == 0 else None,
            ),
            prefix / "nginx.conf",
        )
        proc = self._spawn("proxy", [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], prefix)
        self.proxy_process = proc
        url = f"https://{self.site_address}/health"
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not proc.alive():
                raise HarnessError(f"nginx exited with code {proc.popen.returncode}:\n" + _tail(proc.log_text()))
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return proc
            except (urllib.error.URLError, OSError) as err:
                last = str(err)
            time.sleep(0.1)
        raise HarnessError(f"proxy not healthy at {url} after {timeout:.0f} s ({last}):\n" + _tail(proc.log_text()))

    def _wait_health(self, proc: ManagedProcess, timeout: float) -> None:
        scheme = "https" if self.tls else "http"
        url = f"{scheme}://{self.address}/health"
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert)) if self.tls else None
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if not proc.alive():
                raise HarnessError(
                    f"SuperLink exited with code {proc.popen.returncode} before it was ready:\n"
                    + _tail(proc.log_text())
                )
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as err:
                last_error = str(err)
            time.sleep(0.1)
        raise HarnessError(
            f"SuperLink not healthy at {url} after {timeout:.0f} s ({last_error}):\n" + _tail(proc.log_text())
        )

    def _write_cli_config(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` of the operator CLI with one named connection."""
        home = self.root / "cli"
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{self.connection}"',
            "",
            f"[superlink.{self.connection}]",
            f'address = "{self.address}"',
        ]
        if self.tls:
            lines.append(f"root-certificates = '{self.pki.ca_cert}'")
        else:
            lines.append("insecure = true")
        if self.proxy:  # an outsider: holds the CA certificate, reaches only the public (proxy) address
            lines += [
                "",
                "[superlink.outside]",
                f'address = "{self.site_address}"',
                f"root-certificates = '{self.pki.ca_cert}'",
            ]
        path = home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    # ---------------------------------------------------------------- CLI
    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI as the coordinator's operator (own FLWR_HOME, cwd outside any app)."""
        cmd = [_bin("flwr"), *args]
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.root,
            env=self.env(self.root / "cli", {"COLUMNS": "200", "NO_COLOR": "1"}),
            start_new_session=True,
        )
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            raise HarnessError(
                f"`{' '.join(cmd)}` timed out after {timeout:.0f} s:\n{_tail(out.decode() + err.decode())}"
            ) from None
        result = subprocess.CompletedProcess(cmd, popen.returncode, out.decode(), err.decode())
        if check and result.returncode != 0:
            raise HarnessError(
                f"`{' '.join(cmd)}` failed with code {result.returncode}:\n" + _tail(result.stdout + result.stderr)
            )
        return result

    @staticmethod
    def _json_from(text: str) -> dict:
        start = text.find("{")
        if start < 0:
            raise HarnessError(f"no JSON in CLI output:\n{_tail(text)}")
        return json.loads(text[start:])

    def register(self, index: int) -> int:
        """``flwr supernode register <pub> <connection>`` for node ``index``; returns its node id."""
        _, public = self.node_key(index)
        res = self.flwr("supernode", "register", str(public), self.connection, "--format", "json")
        data = self._json_from(res.stdout)
        if not data.get("success"):
            raise HarnessError(f"registering {public} failed: {data}")
        self.registered[index] = int(data["node-id"])
        return self.registered[index]

    def list_nodes(self) -> list[dict]:
        """``flwr supernode list <connection> --format json`` -> the ``nodes`` list."""
        data = self._json_from(self.flwr("supernode", "list", self.connection, "--format", "json").stdout)
        return list(data.get("nodes", []))

    # ---------------------------------------------------------------- SuperNodes
    def supernode_cmd(
        self,
        index: int,
        port: int,
        node_config: Mapping[str, ConfigValue] | Path | None,
        *,
        use_key: bool | None = None,
        insecure: bool = False,
        root_certificates: Path | None = None,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
    ) -> list[str]:
        cmd = [_bin("flower-supernode")]
        if insecure:
            cmd += ["--insecure"]
        else:
            cmd += ["--root-certificates", str(root_certificates or self.pki.ca_cert)]
        if use_key if use_key is not None else self.node_auth:
            cmd += ["--auth-supernode-private-key", str(self.node_key(index)[0])]
        cmd += ["--superlink", self.site_address, "--port", str(port)]
        if isinstance(node_config, Path):
            cmd += ["--node-config", str(node_config)]
        elif node_config:
            cmd += ["--node-config", format_config(node_config)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            cmd += ["--max-wait-time", str(max_wait_time)]
        return cmd

    def start_supernode(
        self,
        index: int,
        node_config: Mapping[str, ConfigValue] | Path | None = None,
        *,
        wait: bool = True,
        timeout: float = READY_TIMEOUT,
        **cmd_options: object,
    ) -> ManagedProcess:
        """Start SuperNode ``index`` (its own FLWR_HOME and a free runtime port).

        With ``wait`` it returns once the node logged its SuperNode ID (it is activated at the
        link) and raises :class:`HarnessError` with the log if the node exits first.
        """
        current = self.supernodes.get(index)
        if current is not None and current.alive():
            raise HarnessError(f"supernode-{index} is already running (pid {current.pid})")
        self.node_configs[index] = node_config
        cmd = self.supernode_cmd(index, free_port(), node_config, **cmd_options)  # type: ignore[arg-type]
        proc = self._spawn(f"supernode-{index}", cmd, self.root / f"supernode-{index}")
        self.supernodes[index] = proc
        if wait:
            self.wait_supernode_ready(index, timeout)
        return proc

    def wait_supernode_ready(self, index: int, timeout: float = READY_TIMEOUT) -> int:
        """Wait for ``SuperNode ID: <id>`` in this start's log; return the node id."""
        proc = self.supernodes[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _NODE_ID_RE.search(proc.log_text())
            if match:
                proc.node_id = int(match.group(1))
                proc.ready_s = time.monotonic() - proc.started_at
                self.timings.setdefault("supernode_connect_s", proc.ready_s)
                return proc.node_id
            if not proc.alive():
                raise HarnessError(
                    f"supernode-{index} exited with code {proc.popen.returncode} before connecting:\n"
                    + _tail(proc.log_text())
                )
            time.sleep(0.1)
        raise HarnessError(f"supernode-{index} not connected after {timeout:.0f} s:\n" + _tail(proc.log_text()))

    def wait_for_log(self, index: int, text: str, timeout: float = 60.0, occurrence: int = 1) -> None:
        """Wait until SuperNode ``index``'s current log holds ``text`` ``occurrence`` times (e.g. round 2's message)."""
        proc = self.supernodes[index]
        deadline = time.monotonic() + timeout
        while proc.log_text().count(text) < occurrence:
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{text!r} (x{occurrence}) not in supernode-{index} log after {timeout:.0f} s:\n"
                    + _tail(proc.log_text())
                )
            time.sleep(0.2)

    def expect_refused(self, index: int, timeout: float = READY_TIMEOUT, **start_options: object) -> ManagedProcess:
        """Start SuperNode ``index`` and require that it exits non-zero without ever connecting."""
        return self.expect_refused_many({index: start_options}, timeout)[index]

    def expect_refused_many(
        self, attempts: Mapping[int, Mapping[str, object]], timeout: float = READY_TIMEOUT
    ) -> dict[int, ManagedProcess]:
        """Start several SuperNodes at once (index -> start options) and require each to be refused.

        Started together because each refusal is mostly interpreter start-up and retry back-off.
        ``max_retries``/``max_wait_time`` default to 2 / 10 s so a refused node gives up.
        """
        procs = {}
        for index, options in attempts.items():
            opts = {"max_retries": 2, "max_wait_time": 10, **options}
            procs[index] = self.start_supernode(index, wait=False, **opts)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout
        problems = []
        for index, proc in procs.items():
            code = proc.wait(max(0.1, deadline - time.monotonic()))
            log = proc.log_text()
            if code is None:
                proc.signal_group(signal.SIGKILL)
                proc.wait(10)
                problems.append(f"supernode-{index} neither connected nor exited in {timeout:.0f} s:\n{_tail(log)}")
            elif code == 0 or _NODE_ID_RE.search(log):
                problems.append(f"supernode-{index} was admitted (exit {code}) but should be refused:\n{_tail(log)}")
        if problems:
            raise HarnessError("\n\n".join(problems))
        return procs

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int | None:
        """Send ``sig`` to SuperNode ``index``'s whole process group (SIGKILL: a crash); return its exit code."""
        proc = self.supernodes[index]
        proc.signal_group(sig)
        code = proc.wait(timeout)
        if code is None:
            proc.signal_group(signal.SIGKILL)
            code = proc.wait(10)
        if sig != signal.SIGKILL:
            # A graceful stop leaves ClientApp grandchildren nothing to do; make sure none linger.
            proc.signal_group(signal.SIGKILL)
        return code

    def restart_supernode(self, index: int, timeout: float = 120.0, retry_every: float = 3.0) -> ManagedProcess:
        """Start SuperNode ``index`` again with its last node config and key.

        After a SIGKILL the link still holds the node as online until its heartbeat expires
        (up to 60 s in flwr 1.42) and refuses re-activation; retry until it is let in.
        """
        deadline = time.monotonic() + timeout
        began = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            proc = self.start_supernode(index, self.node_configs.get(index), wait=False)
            try:
                self.wait_supernode_ready(index, max(1.0, deadline - time.monotonic()))
                self.timings[f"supernode_{index}_restart_s"] = time.monotonic() - began
                self.timings[f"supernode_{index}_restart_attempts"] = attempts
                return proc
            except HarnessError:
                if proc.alive() or _NOT_ACTIVATED not in proc.log_text():
                    raise
                if time.monotonic() + retry_every >= deadline:
                    raise
                time.sleep(retry_every)

    # ---------------------------------------------------------------- runs
    def run_app(
        self,
        app_dir: Path | str,
        run_config: Mapping[str, ConfigValue] | str | None = None,
        *,
        timeout: float = 600.0,
    ) -> RunResult:
        """``flwr run <app_dir> <connection> --stream [--run-config ...]``; waits for the end.

        ``app_dir`` should be a staged copy (:func:`stage_app`); the output goes to
        ``logs/run-<n>.log`` and the final status is read back with ``flwr ls``.
        """
        self._runs += 1
        cmd = [_bin("flwr"), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            cmd += ["--run-config", run_config if isinstance(run_config, str) else format_config(run_config)]
        log_path = self.logs_dir / f"run-{self._runs}.log"
        began = time.monotonic()
        with log_path.open("wb") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=self.env(self.root / "cli", {"COLUMNS": "200"}),
                start_new_session=True,
            )
            try:
                code = popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(10)
                raise HarnessError(
                    f"flwr run did not finish in {timeout:.0f} s:\n" + _tail(log_path.read_text(errors="replace"))
                ) from None
        wall = time.monotonic() - began
        output = log_path.read_text(encoding="utf-8", errors="replace")
        match = _RUN_ID_RE.search(output)
        result = RunResult(code, output, wall, int(match.group(1)) if match else None)
        if result.run_id is not None:
            result.details = self.run_details(result.run_id)
            result.status = str(result.details.get("status", ""))
        return result

    def run_details(self, run_id: int) -> dict:
        """``flwr ls <connection> --run-id <id> --format json`` -> that run's record."""
        data = self._json_from(self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json").stdout)
        runs = data.get("runs", [])
        return dict(runs[0]) if runs else {}

    # ---------------------------------------------------------------- teardown
    def all_processes(self) -> list[ManagedProcess]:
        procs = list(self.supernodes.values())
        if self.superlink is not None:
            procs.append(self.superlink)
        if self.proxy_process is not None:
            procs.append(self.proxy_process)
        return procs

    def print_logs(self, lines: int = 80) -> None:
        """Write the tail of every process log to the harness log stream (stderr by default)."""
        for path in sorted(self.logs_dir.glob("*.log")):
            text = path.read_text(encoding="utf-8", errors="replace")
            self._log.write(f"\n----- {path.name} (last {lines} lines) -----\n{_tail(text, lines)}\n")
        self._log.flush()

    def leftover_pids(self) -> list[int]:
        """Live processes started by this harness (found by environment marker)."""
        return marked_pids(self.marker)

    def teardown(self, grace: float = 10.0) -> list[int]:
        """Stop SuperNodes, then the SuperLink: SIGTERM, wait ``grace``, SIGKILL, sweep; return survivors."""
        if self._closed:
            return self.leftover_pids()
        self._closed = True
        _LIVE.discard(self)
        groups: Iterable[list[ManagedProcess]] = (
            list(self.supernodes.values()),
            [self.superlink] if self.superlink else [],
            [self.proxy_process] if self.proxy_process else [],
        )
        for group in groups:
            for proc in group:
                if proc.alive():
                    proc.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in group:
                proc.wait(max(0.1, deadline - time.monotonic()))
            for proc in group:
                proc.signal_group(signal.SIGKILL)  # children a graceful exit left behind
                proc.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            survivors = self.leftover_pids()
            if not survivors:
                return []
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        return self.leftover_pids()


def start_federation(
    root: Path | str,
    node_configs: Sequence[Mapping[str, ConfigValue] | Path | None],
    **federation_options: object,
) -> Federation:
    """Start a SuperLink, register one key per node config and start those SuperNodes."""
    fed = Federation(root, **federation_options)  # type: ignore[arg-type]
    try:
        fed.start_superlink()
        for index in range(len(node_configs)):
            if fed.node_auth:
                fed.register(index)
        for index, config in enumerate(node_configs):
            fed.start_supernode(index, config, wait=False)
        for index in range(len(node_configs)):
            fed.wait_supernode_ready(index)
    except BaseException:
        fed.print_logs()
        fed.teardown()
        raise
    return fed
