"""The private broker ``simulate`` starts: the embedded amqtt fallback (MQTT 3.1.1) when Mosquitto is
missing, end to end at CI size, and one clear error line when neither broker can be had."""
from __future__ import annotations

import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import edgetrain.aggregator.local_broker as local_broker_module
import edgetrain.aggregator.simulate as simulate_module
from edgetrain.aggregator.local_broker import EmbeddedBroker, amqtt_available, start_local_broker
from edgetrain.cli import main
from edgetrain.sdk.errors import BrokerUnavailable, ConfigError
from edgetrain.sdk.transport import BrokerConfig, MqttTransport
from tests.fleet import FleetAssets, fleet_assets, metrics  # noqa: F401

needs_amqtt = pytest.mark.skipif(not amqtt_available(), reason="amqtt not installed (pip install amqtt)")


@pytest.fixture
def no_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_broker_module, "find_mosquitto", lambda: None)


@pytest.fixture
def keep_signal_handlers() -> Iterator[None]:
    """``simulate`` run in-process installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_broker_url_carries_the_mqtt_protocol() -> None:
    assert BrokerConfig.parse("mqtt://h:1884").protocol == "5"
    config = BrokerConfig.parse("mqtt://u:p@h:1884?protocol=3.1.1")
    assert (config.url, config.username, config.protocol) == ("mqtt://h:1884", "u", "3.1.1")
    with pytest.raises(ConfigError, match="protocol '4' is not one of"):
        BrokerConfig.parse("mqtt://h?protocol=4")
    with pytest.raises(ConfigError, match="no path, query or fragment"):
        BrokerConfig.parse("mqtt://h?protocol=3.1.1&qos=2")
    with pytest.raises(ConfigError, match="protocol given both"):
        BrokerConfig.parse("mqtt://h?protocol=3.1.1", protocol="5")


@needs_amqtt
def test_embedded_broker_keeps_a_persistent_session_over_mqtt_311(no_mosquitto: None, tmp_path: Path) -> None:
    broker, description = start_local_broker(tmp_path)
    with broker:
        assert isinstance(broker, EmbeddedBroker) and "fell back" in description and broker.url in description
        config = BrokerConfig.parse(broker.url)
        received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        with MqttTransport(config, "pub", clean_start=True) as publisher:
            listener = MqttTransport(config, "listener")
            listener.connect()  # then subscribe: a connected subscribe waits for the SUBACK
            listener.subscribe("fleet/#", lambda topic, payload: received.put((topic, payload)))
            publisher.publish("fleet/a", b"x" * 200_000)
            assert received.get(timeout=10) == ("fleet/a", b"x" * 200_000)
            # Away and back: the QoS 1 message sent meanwhile waits in the session (no anonymous
            # session in our amqtt, which would drop it). amqtt handles a DISCONNECT asynchronously
            # and loses a message it broadcasts to a connection it is still closing: let it finish.
            listener.close()
            time.sleep(0.5)
            publisher.publish("fleet/b", b"while away")
            back = MqttTransport(config, "listener")
            back.subscribe("fleet/#", lambda topic, payload: received.put((topic, payload)))
            with back:
                assert received.get(timeout=10) == ("fleet/b", b"while away")
    assert not broker.running


@needs_amqtt
def test_simulate_falls_back_to_amqtt_end_to_end(fleet_assets: FleetAssets, no_mosquitto: None,  # noqa: F811
                                                 keep_signal_handlers: None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["simulate", "--devices", "2", "--rounds", "2", "--limit-examples", "100", "--eval-examples", "100",
                 "--data-dir", str(fleet_assets.data_dir), "--bundle", str(fleet_assets.bundle), "--out", str(out),
                 "--round-timeout", "30", "--join-timeout", "60"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "simulate: private amqtt broker on mqtt://127.0.0.1:" in printed.out
    assert "no Mosquitto installed: fell back" in printed.out
    records = metrics(out)
    assert [r.round_id for r in records] == [1, 2]
    assert all((r.devices_reported, r.total_examples) == (2, 200) for r in records)
    for i in range(2):
        log = (out / "devices" / f"dev-{i:03d}.log").read_text()
        assert "stopped after training 2 round(s)" in log and "Traceback" not in log
    broker_log = (out / "broker" / "amqtt.log").read_text()
    assert "amqtt broker listening" in broker_log and "Traceback" not in broker_log


def test_simulate_without_any_broker_exits_with_one_line(fleet_assets: FleetAssets, no_mosquitto: None,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started without a broker")

    monkeypatch.setattr(local_broker_module, "amqtt_available", lambda: False)
    monkeypatch.setattr(simulate_module.subprocess, "Popen", must_not_start)
    code = main(["simulate", "--devices", "2", "--rounds", "1", "--data-dir", str(fleet_assets.data_dir),
                 "--bundle", str(fleet_assets.bundle), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("edgetrain simulate: BrokerUnavailable:")
    for fix in ("apt-get install mosquitto", "pip install amqtt", "--broker URL"):
        assert fix in err
    with pytest.raises(BrokerUnavailable, match="amqtt is not installed"):
        EmbeddedBroker(tmp_path / "broker")
