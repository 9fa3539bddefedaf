"""A device's SecAgg+ round over a transport: decode what arrives on its inbox topic, answer each stage.

Handlers only queue (the transport seam forbids publishing from inside one); ``pump`` answers from the caller's
thread. A message that fails to decode, or a stage the client refuses, ends the device's round with
``aborted`` set to the reason; nothing raises out of a handler.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import numpy as np

from .. import topics
from ..errors import SecAggAborted, WireError
from ..transport.base import Transport
from ..wire import decode, encode
from ..wire.secagg import owned_payload
from ..wire.secagg import SecAggRoster, SecAggShareDelivery, SecAggUnmaskRequest
from .client import SecAggClient

_log = logging.getLogger(__name__)
MAX_QUEUED_FRAMES = 64


class SecAggDeviceSession:
    """``client`` over ``transport`` in ``fleet``; ``update`` gives the float vector to sum when it is needed."""

    def __init__(self, transport: Transport, fleet: str, client: SecAggClient,
                 update: Callable[[], np.ndarray], subscribe: bool = True) -> None:
        """``subscribe=False``: the owner already receives the inbox topic and hands frames to ``receive``
        (a ``Device`` routes them off its own queue, so a device host's one thread serves every identity)."""
        self.transport, self.fleet, self.client, self._update = transport, fleet, client, update
        # Bounded: a round has four server messages per device; a flood beyond that is dropped, not held.
        self._inbox: deque[bytes] = deque(maxlen=MAX_QUEUED_FRAMES)
        self.aborted = ""
        self.stages_done: list[str] = []
        if subscribe:
            transport.subscribe(topics.secagg_inbox_topic(fleet, client.device_id), self._on_message)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._inbox.append(payload)

    def receive(self, payload: bytes) -> None:
        """Queue one frame that arrived on this device's secure-aggregation inbox topic."""
        self._inbox.append(payload)

    def _send(self, message: object) -> None:
        self.transport.publish(topics.secagg_topic(self.fleet, self.client.device_id), encode(message))

    def start(self) -> None:
        self._send(self.client.advertise())

    def pump(self) -> bool:
        """Answer everything queued; whether anything was."""
        worked = False
        while self._inbox and not self.aborted:
            worked = True
            try:
                self._answer(owned_payload(decode(self._inbox.popleft())))
            except (SecAggAborted, WireError) as exc:
                self.aborted = getattr(exc, "reason", "") or str(exc).split(":")[0]
                _log.warning("device %s leaves the secure round: %s", self.client.device_id, exc)
        return worked

    def _answer(self, message: object) -> None:
        if isinstance(message, SecAggRoster):
            self._send(self.client.on_roster(message))
        elif isinstance(message, SecAggShareDelivery):
            self._send(self.client.on_delivery(message, self._update()))
        elif isinstance(message, SecAggUnmaskRequest):
            self._send(self.client.on_unmask(message))
        else:
            raise WireError(f"unexpected message: {type(message).__name__} on a secure-aggregation inbox")
        self.stages_done.append(type(message).__name__)
