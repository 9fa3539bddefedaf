"""Private Mosquitto brokers and throw-away TLS material for tests.

``MosquittoBroker`` is the product's ``LocalMosquitto`` (config under a test's tmp dir, a free
127.0.0.1 port, persistence there so ``stop()`` + ``start()`` keeps sessions and queued QoS 1
messages); this module adds skipping when Mosquitto is absent and test certificates.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgetrain.aggregator.local_broker import BrokerTls, LocalMosquitto, find_mosquitto, free_port  # noqa: F401


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


class MosquittoBroker(LocalMosquitto):
    """``aggregator.local_broker.LocalMosquitto`` for tests: skips when Mosquitto is missing and
    generates TLS material on request."""

    def __init__(self, workdir: Path, *, tls: bool = False, tls_material: TlsMaterial | None = None,
                 require_certificate: bool = True, passwords: dict[str, str] | None = None,
                 acl: str | None = None, persistence: bool = True, port: int | None = None,
                 extra_config: str = "") -> None:
        if find_mosquitto() is None:
            pytest.skip("mosquitto not found on PATH or in /usr/sbin; install Debian's mosquitto")
        if passwords and shutil.which("mosquitto_passwd") is None:
            pytest.skip("mosquitto_passwd not found (Debian: mosquitto-clients or mosquitto)")
        server_tls = None
        if tls:
            material = tls_material or make_tls_material(Path(workdir) / "tls")
            server_tls = BrokerTls(material.ca_cert, material.server_cert, material.server_key, require_certificate)
        super().__init__(workdir, tls=server_tls, passwords=passwords, acl=acl, persistence=persistence,
                         port=port, extra_config=extra_config)
