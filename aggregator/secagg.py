"""The aggregator's side of a SecAgg+ round (Bonawitz et al. CCS 2017, figure 4; Bell et al. CCS 2020) as a
state machine: it learns the sum of the surviving devices' quantised updates and nothing else.

Stages: ADVERTISE -> SHARE_KEYS -> MASKED_INPUT -> UNMASK -> DONE (or ABORTED with a reason). ``receive``
takes one device message (the device is the one its topic names) and ``tick`` closes a stage whose deadline
passed; both return the messages to send as ``(recipient, message)``. A stage also closes as soon as every
device it waits for answered. A device missing a stage is a dropout; the round goes on while at least
``threshold`` devices remain and every secret it must reconstruct has ``threshold`` shares, else it aborts.
Rejected messages are counted in ``rejections`` by reason, never raised.
"""
from __future__ import annotations

import enum
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgetrain.sdk import topics
from edgetrain.sdk.errors import ConfigError, SecAggAborted, WireError
from edgetrain.sdk.secagg import keys
from edgetrain.sdk.secagg.masking import add_mask, pair_sign
from edgetrain.sdk.secagg.protocol import RosterView, server_mac_key
from edgetrain.sdk.secagg.quantize import FixedPoint
from edgetrain.sdk.secagg.shamir import SHARE_BYTES, Share, combine_shares
from edgetrain.sdk.transport.base import Transport
from edgetrain.sdk.wire import decode, encode
from edgetrain.sdk.wire.secagg import (SHARE_CIPHERTEXT_BYTES, SecAggAdvertise, SecAggMaskedInput, SecAggMessage,
                                       SecAggRoster, SecAggShareDelivery, SecAggShares, SecAggUnmaskRequest,
                                       SecAggUnmaskShares, owned_payload)

Outgoing = list[tuple[str, SecAggMessage]]


class Stage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SecAggResult:
    """The round's outcome: the float sum of ``survivors``' clipped updates, within ``error_bound`` per value."""

    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    error_bound: float


@dataclass(frozen=True)
class SecAggParams:
    """A round's settings: Shamir ``threshold``, ``neighbours`` k per device, quantisation, stage timeout."""

    threshold: int
    neighbours: int
    fixed_point: FixedPoint
    num_params: int
    stage_timeout_s: float
    # The advertise stage also covers the devices' local training in a real round (None: stage_timeout_s).
    first_stage_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.threshold < 2 or self.neighbours < self.threshold:
            raise ConfigError(f"secure aggregation needs 2 <= threshold <= neighbours, got threshold "
                              f"{self.threshold}, neighbours {self.neighbours}")
        if 2 * self.threshold <= self.neighbours:  # Bell et al.: t > k/2, else a server could collect both secrets
            raise ConfigError(f"threshold {self.threshold} must exceed half the {self.neighbours} neighbours")
        if self.num_params < 1 or not self.stage_timeout_s > 0 or not (self.first_stage_timeout_s or 1) > 0:
            raise ConfigError("secure aggregation needs num_params >= 1 and a stage timeout > 0")


@dataclass
class SecAggServer:
    """One round; ``selected`` devices, ``clock`` returns unix seconds (injected so tests control deadlines)."""

    run_id: str
    round_id: int
    selected: tuple[str, ...]
    params: SecAggParams
    clock: Callable[[], float]
    stage: Stage = Stage.ADVERTISE
    abort_reason: str = ""
    result: SecAggResult | None = None
    rejections: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.params.fixed_point.max_devices < len(self.selected):
            raise ConfigError(f"the quantisation is sized for {self.params.fixed_point.max_devices} devices, "
                              f"{len(self.selected)} are selected: their sum could overflow")
        self._server_key = keys.new_private_key()
        self._deadline = self.clock() + (self.params.first_stage_timeout_s or self.params.stage_timeout_s)
        self._advertised: dict[str, SecAggAdvertise] = {}
        self._view: RosterView | None = None
        self._shares: dict[str, SecAggShares] = {}
        self._masked_with: dict[str, set[str]] = {}
        self._sum: np.ndarray | None = None
        self._survivors: list[str] = []
        self._dropped: tuple[str, ...] = ()
        self._unmask: dict[str, SecAggUnmaskShares] = {}

    # -- intake ----------------------------------------------------------------------------------------
    def receive(self, topic_device: str, message: SecAggMessage) -> Outgoing:
        """Take one message that arrived on ``topic_device``'s topic; what to send in answer."""
        reason = self._reject_reason(topic_device, message)
        if reason:
            self.rejections[reason] += 1
            return []
        handler = {SecAggAdvertise: self._take_advertise, SecAggShares: self._take_shares,
                   SecAggMaskedInput: self._take_masked_input, SecAggUnmaskShares: self._take_unmask}
        try:
            accepted = handler[type(message)](message)
        except WireError as exc:
            self.rejections[str(exc).split(":")[0].replace(" ", "_")] += 1
            return []
        if not accepted:
            return []
        return self._close_stage() if self._waiting_for() <= set(self._answered()) else []

    def tick(self) -> Outgoing:
        """Close the current stage if its deadline passed."""
        if self.stage in (Stage.DONE, Stage.ABORTED) or self.clock() < self._deadline:
            return []
        return self._close_stage()

    def _reject_reason(self, topic_device: str, message: SecAggMessage) -> str:
        expected = {Stage.ADVERTISE: SecAggAdvertise, Stage.SHARE_KEYS: SecAggShares,
                    Stage.MASKED_INPUT: SecAggMaskedInput, Stage.UNMASK: SecAggUnmaskShares}.get(self.stage)
        if getattr(message, "device_id", None) != topic_device:
            return "sender_not_topic"
        if (message.run_id, message.round_id) != (self.run_id, self.round_id):
            return "wrong_round"
        if type(message) is not expected:
            return "wrong_stage"
        if topic_device not in self._waiting_for():
            return "not_expected"
        if topic_device in self._answered():
            return "duplicate"
        return ""

    def _waiting_for(self) -> set[str]:
        if self.stage is Stage.ADVERTISE:
            return set(self.selected)
        if self.stage is Stage.SHARE_KEYS:
            return set(self._advertised)
        if self.stage is Stage.MASKED_INPUT:
            return set(self._shares)
        if self.stage is Stage.UNMASK:
            return set(self._survivors)
        return set()

    def _answered(self) -> dict[str, object]:
        return {Stage.ADVERTISE: self._advertised, Stage.SHARE_KEYS: self._shares,
                Stage.MASKED_INPUT: {d: 1 for d in self._survivors},
                Stage.UNMASK: self._unmask}.get(self.stage, {})

    def _take_advertise(self, message: SecAggAdvertise) -> bool:
        self._advertised[message.device_id] = message
        return True

    def _take_shares(self, message: SecAggShares) -> bool:
        view = self._require_view()
        if message.recipients != view.neighbours[message.device_id]:
            raise WireError("wrong recipients: shares must go to exactly the device's neighbours")
        self._shares[message.device_id] = message
        return True

    def _take_masked_input(self, message: SecAggMaskedInput) -> bool:
        view = self._require_view()
        if len(message.payload) != 8 * view.num_params:
            raise WireError(f"wrong size: {len(message.payload)} bytes, the round has {view.num_params} values")
        key = server_mac_key(self._server_key, view.cipher_keys[message.device_id], view.context, message.device_id)
        if not keys.mac_matches(key, bytes.fromhex(message.tag),
                                *view.mac_parts(message.device_id, "masked-input", message.payload)):
            raise WireError("masked input authentication failed: altered after the device sent it")
        values = np.frombuffer(message.payload, dtype="<u8").astype(np.uint64)
        if np.any(values > view.fixed_point.ring_mask):
            raise WireError("masked input out of range: a value exceeds the ring")
        self._sum = values.copy() if self._sum is None else self._sum + values
        self._survivors.append(message.device_id)
        return True

    def _take_unmask(self, message: SecAggUnmaskShares) -> bool:
        view = self._require_view()
        key = server_mac_key(self._server_key, view.cipher_keys[message.device_id], view.context, message.device_id)
        owners = (",".join(message.self_mask_owners) + "|" + ",".join(message.key_owners)).encode()
        if not keys.mac_matches(key, bytes.fromhex(message.tag),
                                *view.mac_parts(message.device_id, "unmask", owners, message.payload)):
            raise WireError("unmask shares authentication failed: altered after the device sent them")
        if not (set(message.self_mask_owners) <= set(self._survivors)
                and set(message.key_owners) <= set(self._dropped)):
            raise WireError("wrong owners: shares of a survivor's key or a dropout's self-mask are never taken")
        self._unmask[message.device_id] = message
        return True

    def _require_view(self) -> RosterView:
        assert self._view is not None, "stages after ADVERTISE always have a roster"
        return self._view

    # -- stage transitions -------------------------------------------------------------------------------
    def _abort(self, reason: str, detail: str) -> Outgoing:
        self.stage, self.abort_reason = Stage.ABORTED, f"{reason}: {detail}"
        return []

    def _next_stage(self, stage: Stage) -> None:
        self.stage = stage
        self._deadline = self.clock() + self.params.stage_timeout_s

    def _close_stage(self) -> Outgoing:
        return {Stage.ADVERTISE: self._close_advertise, Stage.SHARE_KEYS: self._close_share_keys,
                Stage.MASKED_INPUT: self._close_masked_input, Stage.UNMASK: self._close_unmask}[self.stage]()

    def _close_advertise(self) -> Outgoing:
        devices = tuple(sorted(self._advertised))
        if len(devices) <= self.params.threshold:
            return self._abort("too_few_devices", f"{len(devices)} advertised keys, threshold "
                                                  f"{self.params.threshold} needs more")
        p = self.params
        payload = b"".join(bytes.fromhex(self._advertised[d].cipher_public_key)
                           + bytes.fromhex(self._advertised[d].mask_public_key) for d in devices)
        self._next_stage(Stage.SHARE_KEYS)
        seed, server_key = os.urandom(32).hex(), keys.public_bytes(self._server_key).hex()  # one graph for all
        out: Outgoing = [(d, SecAggRoster(self.run_id, self.round_id, d, devices, p.threshold, p.neighbours, seed,
                                          server_key, p.num_params, p.fixed_point.clip, p.fixed_point.value_bits,
                                          p.fixed_point.max_devices, self._deadline, payload)) for d in devices]
        self._view = RosterView.from_roster(out[0][1])
        return out

    def _close_share_keys(self) -> Outgoing:
        senders = set(self._shares)
        if len(senders) <= self.params.threshold:
            return self._abort("too_few_devices", f"{len(senders)} devices shared keys")
        inbox: dict[str, list[tuple[str, bytes]]] = {d: [] for d in senders}
        for sender in sorted(senders):
            message = self._shares[sender]
            for i, recipient in enumerate(message.recipients):
                if recipient in senders:  # a recipient that did not share its own keys is dropped from now on
                    box = message.payload[i * SHARE_CIPHERTEXT_BYTES : (i + 1) * SHARE_CIPHERTEXT_BYTES]
                    inbox[recipient].append((sender, box))
        self._masked_with = {d: {s for s, _ in boxes} for d, boxes in inbox.items()}
        self._next_stage(Stage.MASKED_INPUT)
        return [(d, SecAggShareDelivery(self.run_id, self.round_id, d, tuple(s for s, _ in boxes),
                                        b"".join(b for _, b in boxes))) for d, boxes in sorted(inbox.items())]

    def _close_masked_input(self) -> Outgoing:
        if len(self._survivors) < self.params.threshold:
            return self._abort("too_few_devices", f"{len(self._survivors)} masked inputs, threshold "
                                                  f"{self.params.threshold}")
        self._survivors.sort()
        self._dropped = tuple(sorted(set(self._shares) - set(self._survivors)))
        self._next_stage(Stage.UNMASK)
        return [(d, SecAggUnmaskRequest(self.run_id, self.round_id, d, tuple(self._survivors), self._dropped))
                for d in self._survivors]

    def _close_unmask(self) -> Outgoing:
        try:
            total = self._unmasked_sum()
        except SecAggAborted as exc:
            return self._abort(exc.reason, exc.detail)
        fp = self.params.fixed_point
        self.result = SecAggResult(fp.dequantise_sum(total, len(self._survivors)), tuple(self._survivors),
                                   self._dropped, fp.sum_error_bound(len(self._survivors)))
        self.stage = Stage.DONE
        return []

    def _collected_shares(self) -> tuple[dict[str, list[Share]], dict[str, list[Share]]]:
        self_mask: dict[str, list[Share]] = {d: [] for d in self._survivors}
        mask_key: dict[str, list[Share]] = {d: [] for d in self._dropped}
        for message in self._unmask.values():
            owners = [*message.self_mask_owners, *message.key_owners]
            for i, owner in enumerate(owners):
                share = Share.from_bytes(message.payload[i * SHARE_BYTES : (i + 1) * SHARE_BYTES])
                (self_mask if i < len(message.self_mask_owners) else mask_key)[owner].append(share)
        return self_mask, mask_key

    def _unmasked_sum(self) -> np.ndarray:
        """Σ y_u minus the survivors' self-masks and the dropouts' pairwise masks (SecAggAborted if impossible)."""
        view, t = self._require_view(), self.params.threshold
        ring_bits = view.fixed_point.ring_bits
        total = self._sum.copy()
        self_mask, mask_key = self._collected_shares()
        for device, shares in self_mask.items():
            seed = self._reconstruct(shares, t, f"the self-mask of {device!r}")
            add_mask(total, seed, -1, ring_bits)
        for dropped, shares in mask_key.items():
            secret = self._reconstruct(shares, t, f"the mask key of dropout {dropped!r}")
            private = keys.load_private(secret)
            if keys.public_bytes(private) != view.mask_keys[dropped]:
                raise SecAggAborted("wrong_share", f"the shares of {dropped!r}'s mask key do not match its public key")
            for survivor in self._survivors:
                if dropped in self._masked_with.get(survivor, ()):
                    seed = view.pair_seed(private, dropped, survivor)
                    add_mask(total, seed, -pair_sign(survivor, dropped), ring_bits)
        return total & view.fixed_point.ring_mask

    @staticmethod
    def _reconstruct(shares: list[Share], threshold: int, what: str) -> bytes:
        if len(shares) < threshold:
            raise SecAggAborted("too_few_shares", f"{len(shares)} shares of {what}, {threshold} needed")
        try:
            return combine_shares(shares, threshold)
        except ConfigError as exc:
            raise SecAggAborted("wrong_share", f"{what}: {exc}") from None


class SecAggServerSession:
    """``server`` over ``transport``: device messages are decoded and checked against their topic, queued by
    the handler and handled by ``pump`` (the transport seam forbids publishing from a handler)."""

    def __init__(self, transport: Transport, fleet: str, server: SecAggServer) -> None:
        self.transport, self.fleet, self.server = transport, fleet, server
        self._inbox: deque[tuple[str, bytes]] = deque()
        transport.subscribe(topics.secagg_filter(fleet), self._on_message)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._inbox.append((topic, payload))

    def pump(self) -> bool:
        """Handle what is queued, then close a stage whose deadline passed; whether anything happened."""
        worked = bool(self._inbox)
        while self._inbox:
            topic, payload = self._inbox.popleft()
            try:
                device = topics.device_from_topic(topic, self.fleet, "secagg")
                message = owned_payload(decode(payload))
            except WireError as exc:
                self.server.rejections[str(exc).split(":")[0].replace(" ", "_")] += 1
                continue
            if not isinstance(message, SecAggMessage.__args__):  # type: ignore[attr-defined]
                self.server.rejections["wrong_message_type"] += 1
                continue
            self._send(self.server.receive(device, message))
        outgoing = self.server.tick()
        self._send(outgoing)
        return worked or bool(outgoing)

    def _send(self, outgoing: Outgoing) -> None:
        for device, message in outgoing:
            self.transport.publish(topics.secagg_inbox_topic(self.fleet, device), encode(message))
