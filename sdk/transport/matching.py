"""MQTT topic names and filters: validation and matching, written once for every transport.

The rules are MQTT 5's (OASIS MQTT Version 5.0, section 4.7): levels split on ``/``; ``+`` matches exactly
one level and must fill its level; ``#`` matches the parent and any number of levels below it and must be
the last level; a filter starting with a wildcard does not match a topic starting with ``$`` (4.7.2); a
shared subscription ``$share/<group>/<filter>`` delivers what ``<filter>`` matches (4.8.2). Pure strings:
no paho, so the in-memory transport and the MQTT one decide "does this message reach that handler" alike.
"""
from __future__ import annotations

from ..errors import TransportError

_SHARE_PREFIX = "$share/"
_MAX_TOPIC_BYTES = 65535  # an MQTT UTF-8 string's length field is 16 bits


def check_topic(topic: str) -> str:
    """``topic`` if it is a name one may publish to; TransportError naming what is wrong with it."""
    _check_string(topic, "topic")
    if "+" in topic or "#" in topic:
        raise TransportError(f"cannot publish to {topic!r}: a topic name has no wildcards")
    return topic


def check_filter(topic_filter: str) -> str:
    """``topic_filter`` if it is a valid subscription filter; TransportError naming the fault."""
    _check_string(topic_filter, "topic filter")
    levels = _inner_filter(topic_filter).split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise TransportError(f"topic filter {topic_filter!r}: '#' must be a whole level and the last")
        if "+" in level and level != "+":
            raise TransportError(f"topic filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a message on ``topic`` is delivered to a subscription on ``topic_filter``."""
    pattern = _inner_filter(topic_filter).split("/")
    levels = topic.split("/")
    if topic.startswith("$") and pattern[0] in ("+", "#"):
        return False  # 4.7.2: $SYS and the like are not matched by a leading wildcard
    for index, part in enumerate(pattern):
        if part == "#":
            return True  # "a/#" matches "a" too: the parent level
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(pattern) == len(levels)


def _inner_filter(topic_filter: str) -> str:
    """The filter a shared subscription ``$share/<group>/<filter>`` matches with."""
    if not topic_filter.startswith(_SHARE_PREFIX):
        return topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2] or "+" in parts[1] or "#" in parts[1]:
        raise TransportError(f"shared subscription {topic_filter!r} must be $share/<group>/<filter>")
    return parts[2]


def _check_string(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise TransportError(f"{what} {value!r} must be a non-empty string")
    if "\x00" in value or len(value.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise TransportError(f"{what} {value[:80]!r} has a NUL character or is over {_MAX_TOPIC_BYTES} bytes")
