"""Many MQTT clients in one process, driven by one event loop: the transport of a device host.

``MqttTransport`` gives every client paho's own network thread (``loop_start``), which waits in
``select()``: FD_SETSIZE (1024) caps a process at ~340 clients (3 descriptors each), and a thread per
client costs memory and wake-ups. Here one ``SelectorLoop`` thread waits on every client's socket
with ``selectors`` (epoll on Linux: no descriptor cap) and calls paho's external-loop API —
``loop_read`` when a socket is readable, ``loop_write`` while ``want_write()``, ``loop_misc`` (keepalive)
every tick — as paho's own ``loop_select``/``loop_asyncio`` examples do. A client has one descriptor
(paho opens its wake-up socket pair only for ``loop_start``/``loop``).

``SelectorTransport`` is ``MqttTransport`` with its connection driven by such a loop: the same client
id, last will, persistent session, PUBACK-waiting ``publish``, subscriptions, takeover detection and
outbox re-publishing, so ``Device`` runs on either unchanged. Differences, all about threads:

- handlers run on the loop's thread (the delivery context of ``base``), shared by every client;
- paho reconnects by itself only inside ``loop_forever``; here the transport schedules its own
  reconnects with exponential backoff and jitter (0.5–1.5x), so a broker restart under a thousand
  clients does not bring them back in one burst;
- connects are paced: at most ``max_handshakes`` CONNECTs wait for their CONNACK at a time (Mosquitto's
  listen backlog is 100); the others queue in the loop;
- reconnect hooks (re-publish the outbox, say "online") run on a small thread pool shared by the loop's
  clients, in order per client, instead of one hook thread per client.

Socket work (connect, reconnect, read, write, close) happens only on the loop's thread; other threads
only queue packets (``publish``/``subscribe``, which paho guards with its own locks) and wake the loop.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import random
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ..broker_config import BrokerConfig
from ..errors import BrokerUnavailable, ConfigError, TransportError
from .mqtt import MqttTransport

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
# paho's objects as this module sees them: only mqtt.py imports paho (tests/test_transport.py holds it to that)
PahoClient = Any

__all__ = ["SelectorLoop", "SelectorTransport"]

HANDSHAKE_EXPIRY_S = 15.0  # a CONNECT unanswered this long no longer holds a pacing slot
CLOSE_WAIT_S = 2.0  # how long close() waits for its DISCONNECT to be written


class SelectorLoop:
    """One thread that drives the sockets of many paho clients (see the module docstring).

    ``max_handshakes`` bounds the CONNECTs in flight (paced connects); ``hook_workers`` threads run
    the clients' reconnect hooks. ``start()`` before the first transport connects; ``stop()`` after
    the last one closed.
    """

    def __init__(self, max_handshakes: int = 50, hook_workers: int = 4, tick_s: float = 0.25) -> None:
        if max_handshakes < 1 or hook_workers < 1 or not tick_s > 0:
            raise ConfigError("SelectorLoop needs max_handshakes >= 1, hook_workers >= 1 and tick_s > 0")
        self.max_handshakes = max_handshakes
        self.tick_s = tick_s
        self.hooks = ThreadPoolExecutor(hook_workers, thread_name_prefix="edgetrain-hooks")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()  # from any thread; run on the loop's
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # loop thread only
        self._timer_seq = itertools.count()
        self._dirty: set[PahoClient] = set()  # clients whose write interest may have changed
        self._dirty_lock = threading.Lock()
        self._fds: dict[PahoClient, int] = {}  # registered socket per client (loop thread only)
        self._waiting: deque[tuple[object, Callable[[], bool]]] = deque()  # connects waiting for a slot
        self._handshakes: dict[object, float] = {}  # owner -> when its CONNECT went out
        self._running = False
        self._thread: threading.Thread | None = None
        self._last_tick = 0.0

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._run, name="edgetrain-selector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (close the transports first: their sockets are simply dropped here)."""
        if self._thread is None:
            return
        self._running = False
        self._wake()
        self._thread.join(timeout=5)
        self._thread = None
        self.hooks.shutdown(wait=False, cancel_futures=True)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def is_running(self) -> bool:
        return self._thread is not None

    @property
    def connections(self) -> int:
        """Sockets open now (connected or handshaking)."""
        return len(self._fds)

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread.ident

    # -- running work on the loop's thread -------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread, soon (thread-safe)."""
        self._calls.append(fn)
        self._wake()

    def call(self, fn: Callable[[], _T], timeout_s: float = 10.0) -> _T:
        """Run ``fn`` on the loop's thread and return its result (its exception is raised here)."""
        if self.in_loop_thread():
            return fn()
        if self._thread is None:
            raise TransportError("the selector loop is not running (SelectorLoop.start() first)")
        future: Future[_T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)
        self.call_soon(run)
        return future.result(timeout_s)

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread after ``delay_s`` (thread-safe)."""
        when = time.monotonic() + delay_s
        self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._timer_seq), fn)))

    # -- paced connects --------------------------------------------------------------------
    def admit(self, owner: object, start: Callable[[], bool]) -> None:
        """Run ``start`` (which sends a CONNECT and says whether it did) once fewer than
        ``max_handshakes`` CONNECTs await their CONNACK. Loop thread only."""
        self._waiting.append((owner, start))
        self._admit_waiting()

    def begin_handshake(self, owner: object) -> None:
        """Count a CONNECT sent outside ``admit`` (a first connect, paced by its caller)."""
        self._handshakes[owner] = time.monotonic()

    def handshake_over(self, owner: object) -> None:
        """The CONNACK came (or the socket closed): free the slot. Loop thread only."""
        if self._handshakes.pop(owner, None) is not None:
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and len(self._handshakes) < self.max_handshakes:
            owner, start = self._waiting.popleft()
            self._handshakes[owner] = time.monotonic()
            try:
                started = start()
            except Exception:  # a defect in one client's reconnect must not stop the others'
                _log.exception("connect of %r raised", owner)
                started = False
            if not started:
                self._handshakes.pop(owner, None)

    # -- paho's socket callbacks -----------------------------------------------------------
    def attach(self, client: PahoClient) -> None:
        """Let this loop drive ``client``'s socket from now on."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_write_interest
        client.on_socket_unregister_write = self._on_write_interest

    def _on_socket_open(self, client: PahoClient, userdata: Any, sock: Any) -> None:
        # connect/reconnect run on the loop's thread only, so the selector is never touched concurrently
        fd = sock.fileno()
        self._selector.register(fd, selectors.EVENT_READ, client)
        self._fds[client] = fd
        self._mark_dirty(client)

    def _on_socket_close(self, client: PahoClient, userdata: Any, sock: Any) -> None:
        fd = self._fds.pop(client, None)  # paho closes the socket right after: unregister by number now
        if fd is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _on_write_interest(self, client: PahoClient, userdata: Any, sock: Any) -> None:
        self._mark_dirty(client)  # any thread (a publish); the loop recomputes from want_write()
        if not self.in_loop_thread():
            self._wake()

    def _mark_dirty(self, client: PahoClient) -> None:
        with self._dirty_lock:
            self._dirty.add(client)

    # -- the loop --------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # already pending (full buffer) or closing
            pass

    def _run(self) -> None:
        while self._running:
            try:
                self._iterate()
            except Exception:  # never let one client's defect stop a thousand
                _log.exception("selector loop iteration failed")

    def _iterate(self) -> None:
        now = time.monotonic()
        timeout = self.tick_s if not self._timers else max(0.0, min(self.tick_s, self._timers[0][0] - now))
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            self._drive(key.data, mask)
        while self._calls:
            self._calls.popleft()()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()
        if now - self._last_tick >= self.tick_s:
            self._last_tick = now
            for client in list(self._fds):
                client.loop_misc()  # keepalive PINGREQ, and the drop of a silent broker
            expired = [o for o, t in self._handshakes.items() if now - t > HANDSHAKE_EXPIRY_S]
            for owner in expired:
                self.handshake_over(owner)
        self._update_interest()

    def _drive(self, client: PahoClient, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            client.loop_read()
        if mask & selectors.EVENT_WRITE and client in self._fds:  # the read may have closed it
            client.loop_write()
        self._mark_dirty(client)

    def _update_interest(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        for client in dirty:
            fd = self._fds.get(client)
            if fd is None:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            if self._selector.get_key(fd).events != events:
                self._selector.modify(fd, events, client)


class _SerialHooks:
    """A transport's reconnect hooks, run in order on the loop's shared pool (``put`` as a queue's)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._pending: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._draining = False

    def put(self, hook: Callable[[], None] | None) -> None:
        if hook is None:
            return
        with self._lock:
            self._pending.append(hook)
            if self._draining:
                return
            self._draining = True
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the loop stopped: nobody runs hooks any more
            with self._lock:
                self._draining = False

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._draining = False
                    return
                hook = self._pending.popleft()
            try:
                hook()
            except Exception:
                _log.exception("reconnect hook %r raised", hook)


class SelectorTransport(MqttTransport):
    """``MqttTransport`` driven by a shared ``SelectorLoop`` (see the module docstring)."""

    def __init__(self, config: BrokerConfig, client_id: str, loop: SelectorLoop, *, clean_start: bool = False,
                 session_expiry_s: int = 3600, will: tuple[str, bytes, bool] | None = None,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0) -> None:
        super().__init__(config, client_id, clean_start=clean_start, session_expiry_s=session_expiry_s, will=will,
                         reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s)
        self._loop = loop
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._attempts = 0  # failed reconnects since the last CONNACK: the backoff exponent
        self._socket_gone = threading.Event()
        self._hooks = _SerialHooks(loop.hooks)  # type: ignore[assignment]  # put() as the queue's
        loop.attach(self._client)

    # -- MqttTransport's seams -------------------------------------------------------------
    def _open_connection(self) -> None:
        def start() -> None:
            self._socket_gone.clear()
            self._loop.begin_handshake(self)
            try:
                self._send_connect()
            except BrokerUnavailable:
                self._loop.handshake_over(self)
                raise
        self._loop.call(start)

    def _start_hook_runner(self) -> None:
        pass  # hooks run on the loop's shared pool

    def _stop_client(self) -> None:
        self._closing = True
        was_open = self._loop.call(lambda: self._client.socket() is not None) if self._loop.is_running else False
        if was_open:
            def disconnect() -> None:
                self._socket_gone.clear()  # set by any earlier drop (a broker restart): wait for this close
                self._client.disconnect()
            self._loop.call(disconnect)
            if not self._loop.in_loop_thread():  # the loop writes the DISCONNECT, then closes the socket
                self._socket_gone.wait(CLOSE_WAIT_S)
        self._connected = False

    # -- paho callbacks (loop thread) ------------------------------------------------------
    def _on_connect(self, client: PahoClient, userdata: object, flags: Any,
                    reason: Any, props: Any) -> None:
        self._loop.handshake_over(self)
        if not reason.is_failure:
            self._attempts = 0
        super()._on_connect(client, userdata, flags, reason, props)

    def _on_disconnect(self, client: PahoClient, userdata: object, flags: Any,
                       reason: Any, props: Any) -> None:
        self._loop.handshake_over(self)
        super()._on_disconnect(client, userdata, flags, reason, props)
        self._socket_gone.set()
        if self._connected_once and not self._closing and self._failure is None:
            self._schedule_reconnect()

    # -- reconnects --------------------------------------------------------------------------
    def _schedule_reconnect(self) -> None:
        """Exponential backoff with jitter, so a thousand clients dropped at once come back spread out."""
        base = min(self._reconnect_max_s, self._reconnect_min_s * 2 ** min(self._attempts, 16))
        self._attempts += 1
        delay = base * random.uniform(0.5, 1.5)
        self._loop.call_later(delay, lambda: self._loop.admit(self, self._try_reconnect))

    def _try_reconnect(self) -> bool:
        """One reconnect (loop thread); False when no CONNECT went out (then the next one is scheduled)."""
        if self._closing or self._failure is not None or self._connected or self._client.socket() is not None:
            return False
        try:
            self._client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as exc:  # the broker is still away
            _log.debug("reconnect of %s to %s failed: %s", self.client_id, self.config.url, exc)
            self._on_connect_fail(self._client, None)
            self._schedule_reconnect()
            return False
        return True
