"""Where the broker is and how to reach it: ``BrokerConfig`` and its URL rules. No paho here, so a
board's CLI can check a ``--broker`` URL (and tests can build one) without loading the MQTT client;
``sdk.transport`` turns it into a connection."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import ConfigError

PROTOCOLS = ("5", "3.1.1")  # the MQTT versions the transport speaks
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to reach the broker. ``url`` is ``mqtt://host[:port]`` or ``mqtts://…``
    without credentials; ``BrokerConfig.parse`` moves ``user:pass@`` and ``?protocol=`` out of a
    URL. ``protocol`` is the MQTT version spoken: "5" (default) or "3.1.1"."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | Path | None = None  # None with mqtts: the system's trusted CAs
    cert_file: str | Path | None = None  # client certificate, for brokers that require one
    key_file: str | Path | None = None
    keepalive_s: int = 30
    protocol: str = "5"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"MQTT protocol {self.protocol!r} is not one of {sorted(PROTOCOLS)}")
        scheme, _, _, user, password = _split_url(self.url)
        if user is not None or password is not None:
            raise ConfigError(f"broker URL carries credentials; use BrokerConfig.parse({self.url!r})")
        if scheme == "mqtt" and any((self.ca_file, self.cert_file, self.key_file)):
            raise ConfigError(f"TLS files given for the plain-text URL {self.url!r}; use mqtts://")
        if self.key_file and not self.cert_file:
            raise ConfigError("key_file given without cert_file")
        if not 5 <= self.keepalive_s <= 65535:
            raise ConfigError(f"keepalive_s must be in [5, 65535], got {self.keepalive_s}")

    @classmethod
    def parse(cls, url: str, **kwargs: object) -> BrokerConfig:
        """Build from a URL that may hold ``user:password@`` and ``?protocol=3.1.1`` (so a bare
        ``--broker`` string can carry the version to device processes); other fields come from
        ``kwargs``."""
        url, protocol = _pop_protocol(url)
        scheme, host, port, user, password = _split_url(url)
        for name, value in (("username", user), ("password", password), ("protocol", protocol)):
            if value is not None and kwargs.get(name) is not None:
                raise ConfigError(f"{name} given both in the broker URL and as an argument")
            if value is not None:
                kwargs[name] = value
        netloc = f"[{host}]" if ":" in host else host
        return cls(f"{scheme}://{netloc}:{port}", **kwargs)  # type: ignore[arg-type]

    @property
    def host(self) -> str:
        return _split_url(self.url)[1]

    @property
    def port(self) -> int:
        return _split_url(self.url)[2]

    @property
    def use_tls(self) -> bool:
        return self.url.startswith("mqtts://")


def _pop_protocol(url: str) -> tuple[str, str | None]:
    """``url`` without a ``?protocol=V`` query, and V (None without one); other queries stay for
    ``_split_url`` to refuse."""
    if not isinstance(url, str) or "?" not in url:
        return url, None
    base, _, query = url.partition("?")
    fields = parse_qs(query, keep_blank_values=True)
    if set(fields) != {"protocol"} or len(fields["protocol"]) != 1 or "#" in query:
        return url, None
    return base, fields["protocol"][0]


def _split_url(url: str) -> tuple[str, str, int, str | None, str | None]:
    """(scheme, host, port, user, password) of a broker URL; ConfigError naming what is wrong."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"broker URL {url!r} must look like mqtt://host[:port] or mqtts://host[:port]")
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"broker URL {url!r}: scheme {parts.scheme!r} is not mqtt or mqtts")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r} must have no path, query or fragment")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.scheme, parts.hostname, port, user, password
