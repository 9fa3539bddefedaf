"""A private Mosquitto on a free loopback port, for ``simulate`` and the tests.

It writes its own config under a working directory, keeps its persistence file there (so
``stop()`` + ``start()`` keeps sessions and queued QoS 1 messages, as a real restart would) and
can take a password file, an ACL and TLS files. Mosquitto started as root drops privileges to user
``mosquitto``, which cannot enter a private temp dir; as root we tell it ``user root``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sdk.errors import BrokerUnavailable


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
            lines.append(f"password_file {self._write_passwords(passwords)}")
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
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerUnavailable(f"mosquitto exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise BrokerUnavailable(f"mosquitto did not listen on {self.port}:\n{self.log_tail()}") from None
                time.sleep(0.02)

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
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
