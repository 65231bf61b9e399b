"""Fetch, format, start, probe and stop a local single-node Apache Kafka in KRaft mode."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from deploy.exceptions import (
    BrokerStartError,
    JarFetchError,
    PortInUseError,
    ToolMissingError,
)

if TYPE_CHECKING:
    from streams.runtime.clients import KafkaConnection
    from streams.settings import Settings

_KAFKA_MAIN = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"
_READY_MARKER = ".complete"
# Brokers this process started, so `down` can reap them (a long-lived parent such as a test
# runner would otherwise keep zombies around).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the local broker runs (built from the JODIE_* settings by the CLI)."""

    cache_dir: Path
    kafka_version: str
    port: int
    controller_port: int
    heap: str
    start_timeout_s: float
    # TLS, SCRAM users and ACLs (deploy/kafka/security.py); the default keeps the local demo
    # plain.
    secure: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerConfig:
        """How `jodie broker` runs the local broker, from the JODIE_* settings."""
        return cls(
            cache_dir=settings.cache_dir,
            kafka_version=settings.kafka_version,
            port=settings.broker_port,
            controller_port=settings.controller_port,
            heap=settings.broker_heap,
            start_timeout_s=settings.broker_start_timeout_s,
            secure=settings.broker_secure,
        )

    @property
    def home(self) -> Path:
        return self.cache_dir / f"broker-{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    home: Path
    ready: bool
    detail: str


def _resource(name: str) -> Path:
    return Path(str(resources.files("deploy.kafka").joinpath(name)))


def jars_dir(cfg: BrokerConfig) -> Path:
    """The jar cache for this Kafka version and this exact dependency spec (the pom)."""
    spec = _resource("pom.xml").read_bytes() + cfg.kafka_version.encode()
    key = hashlib.sha256(spec).hexdigest()[:12]
    return cfg.cache_dir / f"kafka-{cfg.kafka_version}-{key}" / "lib"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolMissingError(
            f"`{tool}` not found on PATH; the local broker needs Java 17+ and Maven"
        )
    return path


def fetch_jars(cfg: BrokerConfig, log: bool = False) -> Path:
    """Resolve the broker and its runtime dependencies into the cache (once per spec)."""
    target = jars_dir(cfg)
    if (target / _READY_MARKER).exists():
        return target
    mvn = _require("mvn")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download into a scratch folder and rename, so an interrupted fetch never looks complete.
    scratch = Path(tempfile.mkdtemp(prefix="lib-", dir=target.parent))
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(_resource("pom.xml")),
        "dependency:copy-dependencies",
        f"-Dkafka.version={cfg.kafka_version}",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={scratch}",
    ]
    proc = subprocess.run(cmd, capture_output=not log, text=True, check=False)
    if proc.returncode != 0 or not any(scratch.glob("kafka_2.13-*.jar")):
        shutil.rmtree(scratch, ignore_errors=True)
        tail = (proc.stderr or proc.stdout or "")[-2000:] if not log else ""
        raise JarFetchError(f"maven failed (exit {proc.returncode}) fetching Kafka jars\n{tail}")
    (scratch / _READY_MARKER).write_text(cfg.kafka_version)
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)
    return target


def _java() -> str:
    java = _require("java")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    text = out.stderr + out.stdout
    # `openjdk version "17.0.15"`: Kafka 4.x brokers need 17 or newer.
    try:
        major = int(text.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        major = 0
    if major < 17:
        raise ToolMissingError(
            f"Kafka 4.x needs Java 17 or newer; `java -version` says: {text.strip()}"
        )
    return java


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _read_pid(cfg: BrokerConfig) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_our_broker(pid, cfg) else None


def _is_our_broker(pid: int, cfg: BrokerConfig) -> bool:
    """True when pid is alive and is a Kafka broker started with this broker's home."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        # No /proc (macOS): fall back to "the process exists".
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    args = [a.decode(errors="replace") for a in cmdline]
    return _KAFKA_MAIN in args and any(str(cfg.home) in a for a in args)


def _write_config(cfg: BrokerConfig) -> Path:
    template = Template(_resource("server.properties").read_text())
    text = template.substitute(
        port=cfg.port, controller_port=cfg.controller_port, data_dir=str(cfg.data_dir)
    )
    path = cfg.home / "server.properties"
    path.write_text(text)
    return path


def _format_storage(
    cfg: BrokerConfig, java: str, classpath: str, config: Path, extra: Sequence[str] = ()
) -> None:
    if (cfg.data_dir / "meta.properties").exists():
        return
    cluster = (
        subprocess.run(
            [java, "-cp", classpath, _STORAGE_TOOL, "random-uuid"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    proc = subprocess.run(
        [java, "-cp", classpath, _STORAGE_TOOL, "format", "-t", cluster, "-c", str(config), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BrokerStartError(f"formatting KRaft storage failed:\n{proc.stdout}{proc.stderr}")


def probe(target: str | KafkaConnection, timeout_s: float = 2.0) -> bool:
    """True when the broker answers a metadata request, not a bare TCP accept. ``target``:
    a local broker's plaintext address, or the settings of a (possibly secured) cluster.
    A refused login raises ``AuthenticationError`` rather than reading as "not ready"."""
    from streams.runtime.clients import Connection, check_login

    conn = Connection(target) if isinstance(target, str) else target
    return check_login(conn, timeout_s)


def status(cfg: BrokerConfig) -> BrokerStatus:
    pid = _read_pid(cfg)
    if pid is None:
        detail = "not running"
        if _port_open(cfg.port):
            detail = f"not started by jodie, but port {cfg.port} is in use by another program"
        return BrokerStatus(False, None, cfg.bootstrap, cfg.home, False, detail)
    ready = probe(_probe_target(cfg))
    return BrokerStatus(True, pid, cfg.bootstrap, cfg.home, ready, "ready" if ready else "starting")


def up(cfg: BrokerConfig, foreground: bool = False) -> tuple[BrokerStatus, bool]:
    """Start the broker unless it runs; returns (status, started_now). Waits for metadata.

    ``foreground`` replaces this process with the broker (for process managers such as
    honcho or systemd, which supervise and stop it themselves).
    """
    current = status(cfg)
    if current.running:
        if not current.ready and current.pid is not None:
            pid = current.pid
            _wait_ready(cfg, lambda: _alive(pid))
        return status(cfg), False
    if _port_open(cfg.port) or _port_open(cfg.controller_port):
        raise PortInUseError(
            f"port {cfg.port} or {cfg.controller_port} is in use by a program jodie did not start; "
            "stop it, or pick free ports with JODIE_BROKER_PORT / JODIE_CONTROLLER_PORT"
        )
    java = _java()
    lib = fetch_jars(cfg)
    classpath = f"{lib}/*"
    for d in (cfg.home, cfg.data_dir, cfg.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    config = _write_config(cfg)
    _format_storage(cfg, java, classpath, config, _secure_setup(cfg, config))
    cmd = [
        java,
        f"-Xmx{cfg.heap}",
        f"-Xms{cfg.heap}",
        # The whole heap is committed at start: RSS is then the broker's real footprint from
        # the first minute (G1 otherwise touches its regions as it first needs them, and a
        # soak saw one 190 MiB step after 15 minutes).
        "-XX:+AlwaysPreTouch",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        # A JVM that dies writes its report beside the logs, not into the working directory.
        f"-XX:ErrorFile={cfg.logs_dir / 'hs_err_pid%p.log'}",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={_resource('log4j2.yaml')}",
        f"-Dkafka.logs.dir={cfg.logs_dir}",
        # Marks the process as ours, so `down` never signals a recycled pid.
        f"-Djodie.broker.home={cfg.home}",
        "-cp",
        classpath,
        _KAFKA_MAIN,
        str(config),
    ]
    if foreground:
        cfg.pid_file.write_text(str(os.getpid()))  # exec keeps the pid
        os.execv(java, cmd)
    with (cfg.logs_dir / "stdout.log").open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    cfg.pid_file.write_text(str(proc.pid))
    _children[proc.pid] = proc
    _wait_ready(cfg, lambda: proc.poll() is None)
    return status(cfg), True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def exit_reason(logs_dir: Path, lines: int = 12) -> str:
    """Why a node that exited did so, as its logs tell it: the last warnings and errors of
    server.log, then the last lines of stdout.log that are not among them (log4j copies its
    warnings there; what stays is the JVM's own report, e.g. a heap it could not reserve). The
    error carries them because a test's clean-up purges the logs."""
    read = {
        name: (logs_dir / name).read_text(errors="replace").splitlines()
        for name in ("server.log", "stdout.log")
        if (logs_dir / name).exists()
    }
    marks = ("] WARN ", "] ERROR ", "] FATAL ")
    warned = [x for x in read.get("server.log", []) if any(m in x for m in marks)]
    told = _collapsed(warned)[-lines:]
    shown = set(warned)
    own = [x for x in read.get("stdout.log", []) if x not in shown][-lines:]
    return "\n".join(x[:400] for x in [*told, *own])


def _collapsed(lines: list[str]) -> list[str]:
    """Each run of log lines saying the same after their timestamp as its last line, counted:
    a node retrying a connection to a dead one logs the same warning 20 times a second, and
    25 of them once filled all the room an error has for the log."""
    out = []
    for _text, group in itertools.groupby(lines, key=lambda line: line.split("] ", 1)[-1]):
        run = list(group)
        out.append(run[-1] if len(run) == 1 else f"{run[-1]} (×{len(run)})")
    return out


def _wait_ready(cfg: BrokerConfig, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerStartError(
                f"the broker exited during start-up; see {cfg.logs_dir / 'server.log'} and "
                f"{cfg.logs_dir / 'stdout.log'}:\n{exit_reason(cfg.logs_dir)}"
            )
        if probe(_probe_target(cfg), timeout_s=1.0):
            return
        time.sleep(0.25)
    raise BrokerStartError(
        f"the broker did not answer metadata requests within {cfg.start_timeout_s:.0f} s; "
        f"see {cfg.logs_dir / 'server.log'}"
    )


def down(cfg: BrokerConfig, purge: bool = False, timeout_s: float = 30.0) -> bool:
    """Stop the broker by its pid (SIGTERM, then SIGKILL); returns whether one was running."""
    pid = _read_pid(cfg)
    was_running = pid is not None
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _is_our_broker(pid, cfg):
            time.sleep(0.2)
        if _is_our_broker(pid, cfg):
            os.kill(pid, signal.SIGKILL)
            while _is_our_broker(pid, cfg):
                time.sleep(0.1)
        child = _children.pop(pid, None)
        if child is not None:
            child.wait(timeout=timeout_s)
    cfg.pid_file.unlink(missing_ok=True)
    if purge:
        shutil.rmtree(cfg.home, ignore_errors=True)
    return was_running


# --- security (`jodie broker up --secure`) -------------------------------------------------
# Kept apart from the rest so the plain broker's code reads as before; the material itself is
# made in deploy/kafka/security.py, the ACLs per role in streams/acls.py.


def _secure_setup(cfg: BrokerConfig, config: Path) -> list[str]:
    """Prepare ``config`` for the broker's mode; returns the storage format's extra
    arguments (the SCRAM users of a secure broker)."""
    from deploy.kafka import security

    security.check_formatted_alike(cfg.home, cfg.data_dir, cfg.secure)
    files = security.files_of(cfg.home)
    if not cfg.secure:
        if not (cfg.data_dir / "meta.properties").exists():
            # Left by a purged secure broker of the same home: it would make `status` log in.
            shutil.rmtree(files.root, ignore_errors=True)
        return []
    security.ensure_material(cfg.home)
    text = security.override_properties(
        config.read_text(),
        security.broker_properties(files, cfg.port, cfg.controller_port),
    )
    # Owner-only: it holds the admin password (the broker's own login).
    security.write_private(config, text)
    security.write_env_files(files, cfg.port, cfg.controller_port)
    return security.format_args(files)


def _probe_target(cfg: BrokerConfig) -> str | KafkaConnection:
    """What `status` and the start-up wait ask for metadata: the plain address, or the admin's
    login on a secure broker."""
    from deploy.kafka import security

    if security.is_secure(cfg.home):
        return security.connection(security.files_of(cfg.home), cfg.port)
    return cfg.bootstrap
