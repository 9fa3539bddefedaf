"""A private broker on a free loopback port, for ``simulate`` and the tests: Mosquitto, or the
embedded pure-Python amqtt where no Mosquitto is installed (``start_local_broker`` picks).

``LocalMosquitto`` writes its own config under a working directory, keeps its persistence file there (so
``stop()`` + ``start()`` keeps sessions and queued QoS 1 messages, as a real restart would) and
can take a password file, an ACL and TLS files. Mosquitto started as root drops privileges to user
``mosquitto``, which cannot enter a private temp dir; as root we tell it ``user root``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgetrain.sdk.errors import BrokerUnavailable

_REPO_ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "amqtt broker listening on"  # what aggregator.amqtt_broker prints once it accepts


def find_mosquitto() -> str | None:
    """The mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BrokerTls:
    """Server-side TLS files; with ``require_certificate`` clients must present a cert the CA signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    require_certificate: bool = True


def _port_accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _wait_until_ready(process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout_s: float, name: str,
                      log_tail: Callable[[], str]) -> None:
    """Block until ``ready()``; BrokerUnavailable (with the log) if the broker exits or is not
    ready within ``timeout_s`` (then it is killed)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise BrokerUnavailable(f"{name} exited with {process.returncode}:\n{log_tail()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise BrokerUnavailable(f"{name} not ready after {timeout_s} s:\n{log_tail()}")
        time.sleep(0.02)


def _read_tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class LocalMosquitto:
    """A private Mosquitto on 127.0.0.1. The constructor starts it; use as a context manager."""

    def __init__(self, workdir: Path, *, tls: BrokerTls | None = None, passwords: dict[str, str] | None = None,
                 acl: str | None = None, persistence: bool = True, port: int | None = None,
                 extra_config: str = "") -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerUnavailable("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto), "
                                    "or pass --broker URL to use a running broker")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = port or free_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'false' if passwords else 'true'}",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
                 "log_type information", "connection_messages true"]
        if os.geteuid() == 0:
            lines.append("user root")
        if persistence:
            (self.workdir / "persist").mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.workdir / 'persist'}/"]
        else:
            lines.append("persistence false")
        if passwords:
            # Each connection's client id is its username: a client with its own credentials can no longer
            # log in under another device's (or the aggregator's) client id and knock the real one off.
            lines += [f"password_file {self._write_passwords(passwords)}", "use_username_as_clientid true"]
        if acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(acl)
            lines.append(f"acl_file {acl_path}")
        if tls is not None:
            lines += [f"cafile {tls.ca_cert}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}",
                      f"require_certificate {'true' if tls.require_certificate else 'false'}"]
        self.config_path.write_text("\n".join(lines + [extra_config, ""]))
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    def __enter__(self) -> "LocalMosquitto":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _write_passwords(self, passwords: dict[str, str]) -> Path:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise BrokerUnavailable("mosquitto_passwd not found (Debian: apt-get install mosquitto-clients)")
        path = self.workdir / "passwords"
        path.write_text("".join(f"{user}:{pw}\n" for user, pw in passwords.items()))
        # -U hashes a plain-text user:password file in place: one process for every user.
        done = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerUnavailable(f"mosquitto_passwd -U failed: {done.stderr.strip()}")
        return path

    def start(self, timeout_s: float = 10.0) -> None:
        """Run the broker (again, on the same port) and wait until the port accepts."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                             stdout=log, stderr=subprocess.STDOUT)
        _wait_until_ready(self._process, lambda: _port_accepts(self.port), timeout_s,
                          f"mosquitto on port {self.port}", self.log_tail)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait: Mosquitto writes its persistence file on the way out."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        if self.running:
            assert self._process is not None
            self._process.kill()
            self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return _read_tail(self.log_path, lines)


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker:
    """amqtt (pure Python, MQTT 3.1.1 only) in a child process on 127.0.0.1, no persistence.

    The fallback where no Mosquitto is installed: 3-6x slower than Mosquitto, and a QoS 1 message
    it delivers to a connection that is just closing is lost (Mosquitto keeps it for the session).
    Its ``url`` carries ``?protocol=3.1.1`` so every client built with ``BrokerConfig.parse``
    speaks 3.1.1 to it.
    The constructor starts it; use as a context manager.
    """

    def __init__(self, workdir: Path, *, port: int | None = None, timeout_s: float = 20.0) -> None:
        if not amqtt_available():
            raise BrokerUnavailable("amqtt is not installed (pip install amqtt)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / "amqtt.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "edgetrain.aggregator.amqtt_broker", "--port", str(self.port)],
                                             stdout=log, stderr=subprocess.STDOUT, env=env)
        # The runner's own line, not a probe connection (amqtt logs an ERROR for one that sends
        # nothing). Importing amqtt takes a second or more on a busy machine: a longer wait.
        _wait_until_ready(self._process, lambda: READY_LINE in self.log_tail(), timeout_s,
                          f"amqtt broker on port {self.port}", self.log_tail)

    def __enter__(self) -> "EmbeddedBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}?protocol=3.1.1"

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the runner shuts amqtt down cleanly), SIGKILL if it hangs."""
        if self.running:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return _read_tail(self.log_path, lines)


def start_local_broker(workdir: Path) -> tuple[LocalMosquitto | EmbeddedBroker, str]:
    """A private broker without persistence, and one line saying which and why: Mosquitto when
    installed, else amqtt when importable, else BrokerUnavailable naming the fixes."""
    if find_mosquitto() is not None:
        broker: LocalMosquitto | EmbeddedBroker = LocalMosquitto(workdir, persistence=False)
        return broker, f"private Mosquitto on {broker.url}"
    if amqtt_available():
        broker = EmbeddedBroker(workdir)
        return broker, (f"private amqtt broker on {broker.url} (no Mosquitto installed: fell back to the "
                        "embedded pure-Python broker, 3-6x slower; apt-get install mosquitto for speed)")
    raise BrokerUnavailable("no broker to start: neither Mosquitto nor amqtt is installed; "
                            "apt-get install mosquitto, or pip install amqtt, or pass --broker URL")
