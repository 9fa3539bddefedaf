"""MQTT topic names for one fleet: pure strings, no paho.

Every topic lives under ``edgetrain/<fleet>/``. Per-device topics end in the device name, which is
also the device's broker username, so a Mosquitto ACL (``pattern … %u``) is enough to stop one
device speaking for another.

==========================  =========  ========  ========================================  ======
topic                       writer     reader    payload                                   retain
==========================  =========  ========  ========================================  ======
``announce``                aggregator devices   the current round (model, hyper-params)   yes
``update/<device>``         device     aggr.     one update frame (delta or gradient)      no
``ack/<device>``            aggregator device    the aggregator took (or refused) an update no
``status/<device>``         device     aggr.     online / offline; the broker publishes    yes
                                                 "offline" as the device's last will
``metrics/<device>``        device     aggr.     latency, bytes, energy of a round         no
``secagg/<device>``         device     aggr.     a secure-aggregation stage message        no
``secagg-in/<device>``      aggregator device    a secure-aggregation stage message        no
==========================  =========  ========  ========================================  ======

The Mosquitto ACL that enforces the table (``mosquitto_acl()`` returns it)::

    user aggregator
    topic readwrite edgetrain/+/announce
    topic write edgetrain/+/ack/+
    topic read edgetrain/+/update/+
    topic read edgetrain/+/status/+
    topic read edgetrain/+/metrics/+
    topic read edgetrain/+/secagg/+
    topic write edgetrain/+/secagg-in/+
    topic readwrite edgetrain/+/work/#

    # every other user is a device, named by its username (%u): its own topics only
    pattern read edgetrain/+/announce
    pattern read edgetrain/+/ack/%u
    pattern write edgetrain/+/update/%u
    pattern readwrite edgetrain/+/status/%u
    pattern write edgetrain/+/metrics/%u
    pattern write edgetrain/+/secagg/%u
    pattern read edgetrain/+/secagg-in/%u

With passwords, also set ``use_username_as_clientid true`` in mosquitto.conf (the generated local
broker does): the client id becomes the username, so a client with its own credentials cannot log in
under another device's (or the aggregator's) client id and knock the real one off (MQTT drops the
older connection of a repeated client id). One connection per username follows from it.
"""
from __future__ import annotations

from .errors import ConfigError, WireError

ROOT = "edgetrain"
MAX_NAME_CHARS = 64
# Per-device topic kinds; ``announce`` is fleet-wide and has no device part.
# ``secagg`` (device -> aggregator) and ``secagg-in`` (aggregator -> device): secure aggregation stages.
DEVICE_KINDS = ("update", "ack", "status", "metrics", "secagg", "secagg-in")
_FORBIDDEN_CHARS = {"/": "a slash", "+": "an MQTT wildcard '+'", "#": "an MQTT wildcard '#'",
                    "\x00": "a NUL character"}


def validate_name(name: str, what: str) -> str:
    """Return ``name`` if it can be one topic level (a fleet or device name); else ConfigError.

    Refused: non-strings, empty, longer than 64 characters, not encodable as UTF-8 (MQTT topics
    are UTF-8), or containing '/', '+', '#' or NUL (they would change the topic's structure).
    """
    if not isinstance(name, str):
        raise ConfigError(f"{what} name must be a string, got {type(name).__name__}")
    if not name:
        raise ConfigError(f"{what} name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"{what} name {name[:20]!r}… is {len(name)} characters, "
                          f"at most {MAX_NAME_CHARS} allowed")
    for char, description in _FORBIDDEN_CHARS.items():
        if char in name:
            raise ConfigError(f"{what} name {name!r} contains {description}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} name {name!r} is not valid UTF-8: {exc.reason}") from None
    return name


def _fleet_prefix(fleet: str) -> str:
    return f"{ROOT}/{validate_name(fleet, 'fleet')}"


def _device_topic(fleet: str, kind: str, device: str) -> str:
    return f"{_fleet_prefix(fleet)}/{kind}/{validate_name(device, 'device')}"


def announce_topic(fleet: str) -> str:
    """Retained: the aggregator's current round announcement."""
    return f"{_fleet_prefix(fleet)}/announce"


def update_topic(fleet: str, device: str) -> str:
    """A device's update frames to the aggregator."""
    return _device_topic(fleet, "update", device)


def ack_topic(fleet: str, device: str) -> str:
    """The aggregator's acknowledgement of a device's update."""
    return _device_topic(fleet, "ack", device)


def status_topic(fleet: str, device: str) -> str:
    """Retained: a device's online/offline state; also its last-will topic."""
    return _device_topic(fleet, "status", device)


def metrics_topic(fleet: str, device: str) -> str:
    """A device's per-round measurements."""
    return _device_topic(fleet, "metrics", device)


def _device_filter(fleet: str, kind: str) -> str:
    return f"{_fleet_prefix(fleet)}/{kind}/+"


def update_filter(fleet: str) -> str:
    """Every device's update topic in the fleet."""
    return _device_filter(fleet, "update")


def ack_filter(fleet: str) -> str:
    """Every device's ack topic in the fleet."""
    return _device_filter(fleet, "ack")


def status_filter(fleet: str) -> str:
    """Every device's status topic in the fleet."""
    return _device_filter(fleet, "status")


def metrics_filter(fleet: str) -> str:
    """Every device's metrics topic in the fleet."""
    return _device_filter(fleet, "metrics")


def device_from_topic(topic: str, fleet: str, kind: str) -> str:
    """The device name in ``edgetrain/<fleet>/<kind>/<device>``.

    ConfigError if ``fleet`` or ``kind`` is not a valid argument; WireError if ``topic`` (which
    came off the wire) is not a ``kind`` topic of ``fleet`` or names an invalid device.
    """
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"topic kind {kind!r} has no device part; expected one of {DEVICE_KINDS}")
    prefix = f"{_fleet_prefix(fleet)}/{kind}/"
    if not topic.startswith(prefix):
        raise WireError(f"topic {topic!r} is not a {kind!r} topic of fleet {fleet!r} "
                        f"(expected {prefix}<device>)")
    device = topic[len(prefix):]
    try:
        return validate_name(device, "device")
    except ConfigError as exc:
        raise WireError(f"topic {topic!r}: {exc}") from None


def parse_device_topic(topic: str, fleet: str) -> tuple[str, str]:
    """``(kind, device)`` of a per-device topic ``edgetrain/<fleet>/<kind>/<device>``; WireError (the
    topic came off the wire) when it is not one of ``fleet``'s per-device topics."""
    prefix = f"{_fleet_prefix(fleet)}/"
    kind = topic[len(prefix):].partition("/")[0] if isinstance(topic, str) and topic.startswith(prefix) else ""
    if kind not in DEVICE_KINDS:
        raise WireError(f"topic {topic!r} is not a per-device topic of fleet {fleet!r} "
                        f"(expected {prefix}<{'|'.join(DEVICE_KINDS)}>/<device>)")
    return kind, device_from_topic(topic, fleet, kind)


def mosquitto_acl(aggregator_user: str = "aggregator") -> str:
    """The Mosquitto ACL file text from this module's docstring, for an aggregator username.

    Devices may write only their own update/status/metrics topics and read only the
    announcement and their own acks; ``%u`` is the connecting client's username.
    """
    user = validate_name(aggregator_user, "aggregator user")
    return "\n".join([
        f"user {user}",
        f"topic readwrite {ROOT}/+/announce",
        f"topic write {ROOT}/+/ack/+",
        f"topic read {ROOT}/+/update/+",
        f"topic read {ROOT}/+/status/+",
        f"topic read {ROOT}/+/metrics/+",
        f"topic read {ROOT}/+/secagg/+",
        f"topic write {ROOT}/+/secagg-in/+",
        f"topic readwrite {ROOT}/+/work/#",  # the coordinator's orders and its workers' partial sums
        "",
        "# every other user is a device, named by its username (%u): its own topics only",
        f"pattern read {ROOT}/+/announce",
        f"pattern read {ROOT}/+/ack/%u",
        f"pattern write {ROOT}/+/update/%u",
        f"pattern readwrite {ROOT}/+/status/%u",
        f"pattern write {ROOT}/+/metrics/%u",
        f"pattern write {ROOT}/+/secagg/%u",
        f"pattern read {ROOT}/+/secagg-in/%u",
        "",
    ])


# -- aggregation workers (aggregator.worker): the coordinator's orders and the workers' partial sums ------
# Not per-device topics: a device's ACL (its own update/status/metrics, the announcement, its acks) gives it
# no access to them, so a device can neither forge an order nor a partial sum.
def work_order_topic(fleet: str) -> str:
    """Retained: the coordinator's current ``WorkOrder`` for its aggregation workers."""
    return f"{_fleet_prefix(fleet)}/work/order"


def partial_topic(fleet: str, worker: str) -> str:
    """An aggregation worker's ``PartialSum`` reports to the coordinator."""
    return f"{_fleet_prefix(fleet)}/work/partial/{validate_name(worker, 'worker')}"


def partial_filter(fleet: str) -> str:
    """Every aggregation worker's partial-sum topic in the fleet."""
    return f"{_fleet_prefix(fleet)}/work/partial/+"


def secagg_topic(fleet: str, device: str) -> str:
    """A device's secure-aggregation messages to the aggregator (``sdk.wire.secagg``)."""
    return _device_topic(fleet, "secagg", device)


def secagg_filter(fleet: str) -> str:
    """Every device's secure-aggregation topic in the fleet."""
    return _device_filter(fleet, "secagg")


def secagg_inbox_topic(fleet: str, device: str) -> str:
    """The aggregator's secure-aggregation messages to one device."""
    return _device_topic(fleet, "secagg-in", device)
