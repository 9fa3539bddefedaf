"""The MQTT implementation of the transport seam: MQTT 5 over paho-mqtt 2.x, the only edgetrain module that
imports paho.

MQTT 3.1.1 is an option (``BrokerConfig(protocol="3.1.1")``, or ``?protocol=3.1.1`` on a URL
given to ``BrokerConfig.parse``) for brokers without MQTT 5, such as the embedded amqtt that
``simulate`` falls back to; it has no session expiry and no properties (see ``MqttTransport``).

``MqttTransport`` keeps a persistent session (clean start only on the very first connection, a
session expiry) so QoS 1 messages published while a device was away reach it when it returns,
reconnects with exponential backoff, re-makes its subscriptions on every connection, and maps
paho's exceptions and reason codes to ``sdk.errors`` here and nowhere else. ``Outbox`` keeps a
device's update on disk until the aggregator's ack arrives; ``MqttTransport.attach_outbox``
re-publishes what it holds after each reconnect. Delivery is at least once: receivers dedupe.

Threads: paho's ``loop_start`` runs one network thread per client; message handlers and paho's
callbacks run on it, so a handler must be quick (hand work to a ``queue.Queue``) and must not call
the blocking ``publish``/``subscribe``. Reconnect hooks run on a separate thread and may block.
Nothing outside this module relies on those threads (see ``base``): a selector-driven client can
replace them behind the same ``Transport`` protocol.

One client id, one connection: when another connection takes over the id, an MQTT 5 broker tells
the older one so with DISCONNECT reason 0x8E "Session taken over" (MQTT 5.0, 3.14.2.1). Reconnecting
would take the session back, and the two processes would knock each other off every second, forever;
so the transport that hears 0x8E stops for good with ``ClientIdInUse`` naming the id (``failure``,
``on_failure``), and the newer connection keeps working. Brokers that close the old socket without a
reason (Mosquitto 2.0.11, as installed here; every MQTT 3.1.1 broker) leave a pattern instead:
connections that the broker closes cleanly (no socket error: the peer ended the stream) seconds after
accepting them, reconnect after reconnect, each taken over by the other process's reconnect. Three such
in a row (``TAKEOVER_CLOSES`` within ``TAKEOVER_WINDOW_S`` of their CONNACK each) count as a takeover too.
In a takeover every reconnect is accepted at once; a failed reconnect (the broker was away: a restart, an
outage) or a socket error or keepalive timeout (a lossy link) resets the count. Kicks alternate between the
two processes, so the one kicked first (the older) reaches three first, and the other is left alone.
"""
from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..broker_config import BrokerConfig
from ..errors import BrokerUnavailable, ConfigError, PublishTimeout, TransportError
from ..outbox import Outbox
from .base import FailureHook, Handler, client_id_in_use, outbox_flush, run_failure_hooks
from .matching import check_filter, topic_matches

_log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")
_PAHO_LEVELS = {mqtt.MQTT_LOG_ERR: logging.ERROR, mqtt.MQTT_LOG_WARNING: logging.WARNING,
                mqtt.MQTT_LOG_NOTICE: logging.INFO, mqtt.MQTT_LOG_INFO: logging.INFO}
_MQTT_MAX_PAYLOAD_BYTES = 268_435_455  # MQTT's remaining-length limit
_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}  # BrokerConfig.protocol -> paho's constant
_SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another connection took this client id
TAKEOVER_CLOSES = 3  # short connections the broker closed in a row that mean another client has our id
TAKEOVER_WINDOW_S = 5.0  # "short": closed within this long of its CONNACK (a reconnect delay is ~1 s)

__all__ = ["MqttTransport"]


class MqttTransport:
    """One MQTT 5 client: connect, subscribe, publish with PUBACK, reconnect, outbox re-publish.

    Register subscriptions *before* ``connect()``: a persistent session's queued messages arrive
    right after the CONNACK, and a message with no handler is dropped with a warning.
    ``clean_start=True`` discards the broker's stored session on the first connection only;
    reconnects always resume the session.

    MQTT 3.1.1 has neither session expiry nor clean-start-on-the-first-connection-only, so there
    ``clean_start=False`` is a persistent session (kept until the broker drops it, whatever
    ``session_expiry_s``) and ``clean_start=True`` a clean session on every connection.
    """

    def __init__(self, config: BrokerConfig, client_id: str, *, clean_start: bool = False,
                 session_expiry_s: int = 3600, will: tuple[str, bytes, bool] | None = None,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 60.0) -> None:
        if not client_id:
            raise ConfigError("client_id is empty; a persistent session needs a stable id")
        if not 0 <= session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError(f"session_expiry_s must be in [0, 2**32 - 1], got {session_expiry_s}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ConfigError("need 0 < reconnect_min_s <= reconnect_max_s")
        if will is not None and (not will[0] or "+" in will[0] or "#" in will[0]):
            raise ConfigError(f"transport {client_id!r}: will topic {will[0]!r} must be a plain topic")
        self.config = config
        self.client_id = client_id
        self.on_reconnect: list[Callable[[], None]] = []  # run after every re-connection
        self.on_failure: list[FailureHook] = []  # run once, on the network thread, when it stops for good
        self._failure: TransportError | None = None
        self._connected_at = 0.0  # time.monotonic() of the last CONNACK
        self._short_closes = 0  # connections in a row the broker closed within TAKEOVER_WINDOW_S
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._subscriptions: dict[str, tuple[Handler, int]] = {}
        self._lock = threading.Lock()
        self._acks = threading.Condition()  # guards the three dicts below
        self._puback: dict[int, mqtt.ReasonCode] = {}
        self._suback: dict[int, list[mqtt.ReasonCode]] = {}
        self._abandoned: set[int] = set()  # publishes whose caller gave up waiting
        self._connack = threading.Event()
        self._connack_reason: mqtt.ReasonCode | None = None
        self._closed_before_connack: str | None = None  # why the first attempt's socket closed
        self._last_paho_error = ""
        self._closing = False
        self._connected = False
        self._connected_once = False
        self._max_packet_bytes: int | None = None
        self._network_thread: int | None = None
        self._hooks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._hook_thread: threading.Thread | None = None
        self._after_first_connect: list[Callable[[], None]] = []

        self._mqtt5 = config.protocol == "5"
        self._client = self._make_client(clean_start, will, reconnect_min_s, reconnect_max_s)

    def _make_client(self, clean_start: bool, will: tuple[str, bytes, bool] | None, reconnect_min_s: float,
                     reconnect_max_s: float) -> mqtt.Client:
        """The paho client: credentials, TLS, last will, reconnect back-off and our callbacks."""
        config, client_id = self.config, self.client_id
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=_PROTOCOLS[config.protocol],
                             clean_session=None if self._mqtt5 else clean_start)
        client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        try:
            if config.use_tls:
                client.tls_set(ca_certs=_opt(config.ca_file), certfile=_opt(config.cert_file),
                               keyfile=_opt(config.key_file), cert_reqs=ssl.CERT_REQUIRED)
            if will is not None:
                will_topic, will_payload, will_retain = will
                client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        except (OSError, ValueError) as exc:  # unreadable certificate or key, bad will topic
            raise ConfigError(f"transport {client_id!r} for {config.url}: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_log = self._on_log
        return client

    # -- lifecycle -------------------------------------------------------------------------
    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; BrokerUnavailable names the URL and the cause.
        A transport that stopped for good (``failure``) raises that instead: it never reconnects."""
        if self._failure is not None:
            raise self._failure
        if self._connected:
            return
        url = self.config.url
        self._closing = False
        self._connack.clear()
        self._closed_before_connack = None
        self._open_connection()
        if not self._connack.wait(timeout_s):
            self._stop_client()
            hint = ("; a broker that speaks only MQTT 3.1.1 may stay silent (add ?protocol=3.1.1 to the URL)"
                    if self._mqtt5 else "")
            raise BrokerUnavailable(f"broker {url} sent no CONNACK within {timeout_s} s{hint}")
        if self._closed_before_connack is not None:  # e.g. TLS 1.3 refusing our certificate
            self._stop_client()
            raise BrokerUnavailable(f"broker {url} closed the connection before its CONNACK: "
                                    f"{self._closed_before_connack}")
        reason = self._connack_reason
        if reason is not None and reason.is_failure:
            self._stop_client()
            raise BrokerUnavailable(f"broker {url} refused the connection: {reason} "
                                    f"(reason code {reason.value:#04x})")
        self._start_hook_runner()
        while self._after_first_connect:
            self._hooks.put(self._after_first_connect.pop(0))

    def _open_connection(self) -> None:
        """Open the socket, send CONNECT and start driving the connection (here: paho's network thread;
        ``selector.SelectorTransport`` drives it from a shared event loop instead)."""
        self._send_connect()
        self._client.loop_start()

    def _send_connect(self) -> None:
        """paho's connect: the socket and the CONNECT packet; BrokerUnavailable names the URL and the cause."""
        url = self.config.url
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        clean = mqtt.MQTT_CLEAN_START_FIRST_ONLY if self._clean_start else False
        try:
            if self._mqtt5:
                self._client.connect(self.config.host, self.config.port, self.config.keepalive_s,
                                     clean_start=clean, properties=props)
            else:  # MQTT 3.1.1: the clean_session flag given to paho's Client stands in for both
                self._client.connect(self.config.host, self.config.port, self.config.keepalive_s)
        except ssl.SSLError as exc:
            raise BrokerUnavailable(f"TLS handshake with broker {url} failed: {exc}") from exc
        except (OSError, ValueError) as exc:  # refused, DNS, unreachable, socket timeout
            raise BrokerUnavailable(f"cannot reach broker {url}: {exc}") from exc

    def _start_hook_runner(self) -> None:
        """Where reconnect hooks run: one thread of this transport's own."""
        if self._hook_thread is None:
            self._hook_thread = threading.Thread(target=self._run_hooks, daemon=True,
                                                 name=f"edgetrain-hooks-{self.client_id}")
            self._hook_thread.start()

    def close(self) -> None:
        """Send a clean DISCONNECT (so no last will) and stop the threads."""
        self._stop_client()
        if self._hook_thread is not None:
            self._hooks.put(None)
            self._hook_thread.join(timeout=5)
            self._hook_thread = None

    def __enter__(self) -> MqttTransport:
        if not self._connected:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def discard_session(self) -> None:
        """Drop what the broker kept for this client id from an earlier run: a throw-away clean-start
        connection with no session expiry, so that ours can then connect without clean start (Mosquitto
        2.0 persists only sessions whose current connection did not ask for a clean start)."""
        if self._connected:
            raise TransportError(f"transport {self.client_id!r}: discard_session() while connected would "
                                 "take over its own session; call it before connect()")
        wipe = MqttTransport(self.config, self.client_id, clean_start=True, session_expiry_s=0)
        wipe.connect()
        wipe.close()

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def failure(self) -> TransportError | None:
        return self._failure

    # -- subscribe / publish ---------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1,
                  timeout_s: float = 10.0) -> None:
        """Remember ``handler`` for ``topic_filter`` (re-made on every connection); when
        connected, block until the broker's SUBACK and raise TransportError if it refuses."""
        check_filter(topic_filter)
        with self._lock:
            self._subscriptions[topic_filter] = (handler, qos)
        if not self._connected:
            return
        self._refuse_on_network_thread("subscribe")
        rc, mid = self._client.subscribe(topic_filter, qos=qos)
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return  # the next connection subscribes
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"subscribe to {topic_filter!r} failed: {mqtt.error_string(rc)}")
        with self._acks:
            if not self._acks.wait_for(lambda: mid in self._suback or self._failure is not None, timeout_s):
                raise TransportError(f"no SUBACK for {topic_filter!r} within {timeout_s} s")
            if self._failure is not None:
                raise self._failure
            reasons = self._suback.pop(mid)
        if any(r.is_failure for r in reasons):
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise TransportError(f"broker {self.config.url} refused the subscription to "
                                 f"{topic_filter!r}: {reasons[0]}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout_s: float = 10.0) -> None:
        """Publish and block until the broker's PUBACK (QoS 1) or the send (QoS 0).

        If the connection is down, paho keeps the message and sends it after the reconnect, so
        a publish that outlives a short outage succeeds; otherwise PublishTimeout. A PUBACK with
        a failure reason (not authorised, quota…) raises TransportError; after the transport stopped
        for good, its ``failure``.
        """
        if self._failure is not None:
            raise self._failure
        self._refuse_on_network_thread("publish")
        self._check_size(topic, payload)
        try:
            info = self._client.publish(topic, bytes(payload), qos=qos, retain=retain)
        except ValueError as exc:  # invalid topic or QoS, or payload over MQTT's limit
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        with self._acks:
            if not self._acks.wait_for(lambda: info.mid in self._puback or self._failure is not None, timeout_s):
                self._abandoned.add(info.mid)
                raise PublishTimeout(f"no PUBACK from broker {self.config.url} for {topic!r} "
                                     f"within {timeout_s} s (connected: {self._connected})")
            if info.mid not in self._puback:  # woken by the failure, not by a PUBACK
                self._abandoned.add(info.mid)
                raise self._failure  # type: ignore[misc]  # not None: the wait above ended on it
            reason = self._puback.pop(info.mid)
        if reason.is_failure:
            raise TransportError(f"broker {self.config.url} refused the publish to {topic!r}: "
                                 f"{reason} (reason code {reason.value:#04x})")

    def attach_outbox(self, outbox: Outbox, timeout_s: float = 10.0) -> None:
        """Re-publish ``outbox``'s entries now (or once connected) and after every reconnect,
        on the hook thread; entries stay until the application removes them."""
        flush = outbox_flush(self, outbox, timeout_s, _log)
        self.on_reconnect.append(flush)
        if self._connected:
            self._hooks.put(flush)
        else:
            self._after_first_connect.append(flush)

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, props: Properties) -> None:
        self._network_thread = threading.get_ident()
        self._connack_reason = reason
        if self._failure is not None:  # stopped for good (taken over): never take the session back
            client.disconnect()
            return
        if reason.is_failure:
            _log.warning("broker %s refused the connection: %s", self.config.url, reason)
            self._connack.set()
            return
        self._max_packet_bytes = getattr(props, "MaximumPacketSize", None)
        self._connected_at = time.monotonic()
        self._last_paho_error = ""  # from here on, an error logged by paho means the socket failed
        with self._lock:
            subscriptions = [(f, q) for f, (_, q) in self._subscriptions.items()]
        if subscriptions:  # the broker may have lost the session: always subscribe again
            client.subscribe(subscriptions)
        self._connected = True
        if self._connected_once:
            _log.info("reconnected to %s (session present: %s)", self.config.url,
                      flags.session_present)
            for hook in list(self.on_reconnect):
                self._hooks.put(hook)
        self._connected_once = True
        self._connack.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: mqtt.ReasonCode, props: Properties | None) -> None:
        was_connected = self._connected
        self._connected = False
        if was_connected and self._taken_over(flags, reason):
            evidence = ("the broker said 'Session taken over'" if flags.is_disconnect_packet_from_server else
                        f"the broker closed {self._short_closes} connections in a row within "
                        f"{TAKEOVER_WINDOW_S:g} s of accepting each")
            self._fail(client_id_in_use(self.client_id, self.config.url, evidence))
            # paho resets its state after this callback, so stopping its reconnect loop from here does not
            # stick: the hook thread stops it; a reconnect that slips in first is closed by _on_connect.
            self._hooks.put(self._stop_client)
        elif was_connected:  # our own close() is no news: only a drop is worth a line
            _log.log(logging.DEBUG if self._closing else logging.INFO, "disconnected from %s: %s", self.config.url, reason)
        elif not self._connack.is_set():
            self._closed_before_connack = f"{reason}; {self._last_paho_error}".rstrip("; ")
            self._connack.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._short_closes = 0  # the broker was away (a restart, an outage): not another client taking our id

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # paho reports socket and TLS failures only here
            if self._closing and message.startswith("Client is not connected"):
                return  # paho's loop thread runs once more after our own disconnect(): not an error
            self._last_paho_error = message
        _paho_log.log(_PAHO_LEVELS.get(level, logging.DEBUG), "%s", message)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for f, (h, _) in self._subscriptions.items() if topic_matches(f, msg.topic)]
        if not handlers:
            _log.warning("message on %r has no handler; dropped", msg.topic)
        for handler in handlers:
            try:
                handler(msg.topic, msg.payload)
            except Exception:  # a failing handler must not kill the network thread
                _log.exception("handler for %r raised", msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason: mqtt.ReasonCode, props: Properties) -> None:
        with self._acks:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._puback[mid] = reason
            self._acks.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[mqtt.ReasonCode], props: Properties) -> None:
        with self._acks:
            self._suback[mid] = reasons
            self._acks.notify_all()

    # -- helpers ---------------------------------------------------------------------------
    def _taken_over(self, flags: mqtt.DisconnectFlags, reason: mqtt.ReasonCode) -> bool:
        """Whether the connection that just ended was taken over by another client with our id."""
        if self._closing:
            return False
        if self._mqtt5 and flags.is_disconnect_packet_from_server:
            return bool(reason.value == _SESSION_TAKEN_OVER)
        closed_cleanly = not self._last_paho_error  # paho logs an error for a reset or timeout, not for EOF
        short = time.monotonic() - self._connected_at < TAKEOVER_WINDOW_S
        self._short_closes = self._short_closes + 1 if closed_cleanly and short else 0
        return self._short_closes >= TAKEOVER_CLOSES

    def _fail(self, failure: TransportError) -> None:
        """Stop for good: wake every waiting publish/subscribe with ``failure``, then tell the hooks."""
        if self._failure is not None:
            return
        with self._acks:
            self._failure = failure
            self._acks.notify_all()
        run_failure_hooks(self.on_failure, failure, _log)

    def _run_hooks(self) -> None:
        while (hook := self._hooks.get()) is not None:
            try:
                hook()
            except Exception:
                _log.exception("reconnect hook %r raised", hook)

    def _stop_client(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False

    def _refuse_on_network_thread(self, what: str) -> None:
        if threading.get_ident() == self._network_thread:
            raise TransportError(f"blocking {what} called from a message handler would deadlock "
                                 "paho's network thread; hand the work to a queue")

    def _check_size(self, topic: str, payload: bytes) -> None:
        # PUBLISH = type byte + remaining length (1-4) + [topic length (2) + topic + packet id (2)
        # + properties length (1) + payload]; the broker announced its limit in the CONNACK.
        remaining = 2 + len(topic.encode("utf-8")) + 2 + 1 + len(payload)
        packet_bytes = 1 + (1 if remaining < 128 else 2 if remaining < 16384 else
                            3 if remaining < 2097152 else 4) + remaining
        limit = self._max_packet_bytes
        if len(payload) > _MQTT_MAX_PAYLOAD_BYTES or (limit is not None and packet_bytes > limit):
            raise TransportError(
                f"payload of {len(payload)} bytes for {topic!r} exceeds the maximum packet size "
                f"of broker {self.config.url} ({limit or _MQTT_MAX_PAYLOAD_BYTES} bytes); "
                "chunk the update or raise the broker's max_packet_size")


def _opt(path: str | Path | None) -> str | None:
    return None if path is None else str(path)

