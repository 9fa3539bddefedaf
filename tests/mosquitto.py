"""Private Mosquitto brokers and throw-away TLS material for tests.

Each ``MosquittoBroker`` writes its own config under a test's tmp dir, listens on a free
127.0.0.1 port and keeps its persistence file there, so a ``stop()`` + ``start()`` keeps
sessions and queued QoS 1 messages, as a real restart would. Mosquitto started as root drops
privileges to user ``mosquitto``, which cannot enter pytest's 0700 tmp dirs; as root we
therefore tell it ``user root`` (ignored when not root).
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

import pytest


def find_mosquitto() -> str | None:
    """The mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsMaterial:
    """A test CA, a server certificate for 127.0.0.1/localhost and client certificates."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_certs: dict[str, tuple[Path, Path]]  # client name -> (cert, key)


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {done.stderr.strip()}")


def _signed_cert(directory: Path, name: str, subject: str, extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}{s}" for s in (".key", ".csr", ".crt", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", subject, cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", cert, "-extfile", ext, cwd=directory)
    return cert, key


def make_tls_material(directory: Path, client_names: tuple[str, ...] = ("device-1",)) -> TlsMaterial:
    """Generate a CA, a server cert (CN/SAN 127.0.0.1, localhost) and one cert per client."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found; cannot make TLS test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=edgetrain-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    leaf = ("basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\nkeyUsage=critical,digitalSignature\n")
    server_cert, server_key = _signed_cert(
        directory, "server", "/CN=127.0.0.1",
        leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    clients = {name: _signed_cert(directory, f"client-{name}", f"/CN={name}",
                                  leaf + "extendedKeyUsage=clientAuth\n")
               for name in client_names}
    return TlsMaterial(directory / "ca.crt", server_cert, server_key, clients)


class MosquittoBroker:
    """A private Mosquitto on 127.0.0.1; ``start()`` runs it (the constructor does too)."""

    def __init__(self, workdir: Path, *, tls: bool = False, tls_material: TlsMaterial | None = None,
                 require_certificate: bool = True, passwords: dict[str, str] | None = None,
                 acl: str | None = None, persistence: bool = True, port: int | None = None,
                 extra_config: str = "") -> None:
        binary = find_mosquitto()
        if binary is None:
            pytest.skip("mosquitto not found on PATH or in /usr/sbin; install Debian's mosquitto")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = port or free_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        if tls and tls_material is None:
            tls_material = make_tls_material(self.workdir / "tls")
        lines = [f"listener {self.port} 127.0.0.1",
                 f"allow_anonymous {'false' if passwords else 'true'}",
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
        if tls:
            assert tls_material is not None
            lines += [f"cafile {tls_material.ca_cert}", f"certfile {tls_material.server_cert}",
                      f"keyfile {tls_material.server_key}",
                      f"require_certificate {'true' if require_certificate else 'false'}"]
        self.config_path.write_text("\n".join(lines + [extra_config, ""]))
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _write_passwords(self, passwords: dict[str, str]) -> Path:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            pytest.skip("mosquitto_passwd not found (Debian: mosquitto-clients or mosquitto)")
        path = self.workdir / "passwords"
        path.write_text("".join(f"{user}:{pw}\n" for user, pw in passwords.items()))
        # -U hashes a plain-text user:password file in place: one process for every user.
        done = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mosquitto_passwd -U failed: {done.stderr.strip()}")
        return path

    def start(self, timeout_s: float = 10.0) -> None:
        """Run the broker (again, on the same port) and wait until the port accepts."""
        if self._process is not None and self._process.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log_tail()}")
                time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait: Mosquitto writes its persistence file on the way out."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        if self._process is not None and self._process.poll() is None:
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
