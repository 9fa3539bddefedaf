"""Mosquitto bridge configuration for the edge -> core topology (docs/brokers.md explains the choices).

Devices connect to a Mosquitto near them (an edge broker: a gateway, a site's server); each edge broker
bridges the fleet's topics to one core broker where the aggregator (and its workers) connect. The bridge
is Mosquitto's own (``connection``/``address``/``topic``): nothing of ours runs on the edge.

``topic edgetrain/# both 1``: updates, status and metrics flow up, the retained announcement and the acks
flow down, at QoS 1 both ways (QoS 0 on a bridge hop would make the device's QoS 1 a lie).
``cleansession false`` + a fixed ``remote_clientid``: the core keeps the bridge's session across an edge
restart, so acks and announcements published while the edge was away are delivered when it returns.
``bridge_protocol_version mqttv50`` keeps MQTT 5 end to end; ``try_private true`` lets a Mosquitto core
recognise the bridge and not echo its own messages back (no loops with ``both``).
"""
from __future__ import annotations

from edgetrain.sdk import topics
from edgetrain.sdk.errors import ConfigError


def edge_bridge_config(name: str, core_host: str, core_port: int, *, username: str | None = None,
                       password: str | None = None) -> str:
    """The mosquitto.conf lines that bridge an edge broker to the core at ``core_host:core_port``."""
    topics.validate_name(name, "bridge")
    if not 0 < core_port < 65536:
        raise ConfigError(f"core broker port must be in 1..65535, got {core_port}")
    if not core_host or any(c.isspace() for c in core_host):
        raise ConfigError(f"core broker host {core_host!r} is empty or contains whitespace")
    lines = [
        f"connection {name}",
        f"address {core_host}:{core_port}",
        f"topic {topics.ROOT}/# both 1",
        "bridge_protocol_version mqttv50",
        "cleansession false",
        f"remote_clientid {name}",
        "try_private true",
        "restart_timeout 1 10",  # reconnect to the core quickly at first, back off to 10 s
    ]
    if username is not None:
        lines.append(f"remote_username {username}")
    if password is not None:
        lines.append(f"remote_password {password}")
    return "\n".join(lines) + "\n"
