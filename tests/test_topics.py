"""Topic table, name validation and topic parsing (pure strings, no broker)."""
from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgetrain.sdk import topics
from edgetrain.sdk.errors import ConfigError, WireError

KIND_FUNCTIONS = {
    "update": (topics.update_topic, topics.update_filter),
    "ack": (topics.ack_topic, topics.ack_filter),
    "status": (topics.status_topic, topics.status_filter),
    "metrics": (topics.metrics_topic, topics.metrics_filter),
}

valid_names = st.text(
    alphabet=st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",)),
    min_size=1, max_size=topics.MAX_NAME_CHARS)


def test_topic_table_layout() -> None:
    assert topics.announce_topic("f1") == "edgetrain/f1/announce"
    assert topics.update_topic("f1", "jetson-3") == "edgetrain/f1/update/jetson-3"
    assert topics.ack_topic("f1", "d") == "edgetrain/f1/ack/d"
    assert topics.status_topic("f1", "d") == "edgetrain/f1/status/d"
    assert topics.metrics_topic("f1", "d") == "edgetrain/f1/metrics/d"
    assert topics.update_filter("f1") == "edgetrain/f1/update/+"


@pytest.mark.parametrize("kind", sorted(KIND_FUNCTIONS))
@given(fleet=valid_names, device=valid_names)
def test_device_topics_round_trip_and_match_their_filter(kind: str, fleet: str, device: str) -> None:
    make_topic, make_filter = KIND_FUNCTIONS[kind]
    topic = make_topic(fleet, device)
    assert topics.device_from_topic(topic, fleet, kind) == device
    assert mqtt.topic_matches_sub(make_filter(fleet), topic)
    other_kinds = [k for k in KIND_FUNCTIONS if k != kind]
    assert not any(mqtt.topic_matches_sub(KIND_FUNCTIONS[k][1](fleet), topic) for k in other_kinds)


@pytest.mark.parametrize("bad, why", [
    ("", "empty"), ("a/b", "slash"), ("a+", "wildcard"), ("#", "wildcard"), ("a\x00b", "NUL"),
    ("x" * 65, "65 characters"), ("bad\udcff", "UTF-8"), (7, "string"),
])
def test_validate_name_refuses(bad: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        topics.validate_name(bad, "device")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        topics.update_topic("fleet", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        topics.announce_topic(bad)  # type: ignore[arg-type]


def test_validate_name_accepts_the_longest_and_unicode() -> None:
    assert topics.validate_name("x" * 64, "device") == "x" * 64
    assert topics.validate_name("capteur-été", "device") == "capteur-été"


@pytest.mark.parametrize("topic", [
    "edgetrain/f1/ack/d1",  # wrong kind
    "edgetrain/f2/update/d1",  # wrong fleet
    "edgetrain/f1/update/",  # no device
    "edgetrain/f1/update/d1/extra",  # one level too many
    "other/f1/update/d1",
])
def test_device_from_topic_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(WireError):
        topics.device_from_topic(topic, "f1", "update")


def test_device_from_topic_refuses_an_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="announce"):
        topics.device_from_topic("edgetrain/f1/announce", "f1", "announce")


def test_acl_gives_devices_their_own_topics_only() -> None:
    acl = topics.mosquitto_acl("agg")
    lines = acl.splitlines()
    assert lines[0] == "user agg"
    for kind in ("update", "status", "metrics"):
        assert any(line.startswith("pattern") and f"/{kind}/%u" in line and "write" in line
                   for line in lines)
    # no pattern line lets a device write another device's topic or the announcement
    assert not any(line.startswith("pattern") and "write" in line and line.endswith("/+")
                   for line in lines)
    assert "pattern read edgetrain/+/announce" in lines
    assert "ACL" in (topics.__doc__ or "") and "pattern write edgetrain/+/update/%u" in topics.__doc__


def test_parse_device_topic_names_kind_and_device_and_refuses_the_rest() -> None:
    from edgetrain.sdk.errors import WireError

    assert topics.parse_device_topic(topics.update_topic("f", "pi-1"), "f") == ("update", "pi-1")
    assert topics.parse_device_topic(topics.status_topic("f", "pi-2"), "f") == ("status", "pi-2")
    for bad in (topics.announce_topic("f"), topics.update_topic("g", "pi-1"), "edgetrain/f/update",
                "edgetrain/f/update/a/b", "edgetrain/f/bogus/pi-1", "edgetrain/f/update/"):
        with pytest.raises(WireError):
            topics.parse_device_topic(bad, "f")
