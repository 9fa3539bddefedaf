"""The device's side of a SecAgg+ round as a state machine (Bonawitz et al. CCS 2017, figure 4; Bell et al.
CCS 2020): each ``on_*`` method takes the server's message of a stage and returns the device's answer, or
raises ``SecAggAborted`` with a reason. No I/O: ``SecAggDeviceSession`` (``sdk.secagg.session``) moves the
messages.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import SecAggAborted, WireError
from ..wire.secagg import (SecAggAdvertise, SecAggMaskedInput, SecAggRoster, SecAggShareDelivery, SecAggShares,
                           SecAggUnmaskRequest, SecAggUnmaskShares, SHARE_CIPHERTEXT_BYTES)
from . import keys
from .masking import mask_input
from .protocol import RosterView, device_mac_key
from .shamir import SHARE_BYTES, Share, split_secret


class SecAggClient:
    """One device in one round: advertise -> shares -> masked input -> unmask shares."""

    def __init__(self, device_id: str, run_id: str, round_id: int) -> None:
        self.device_id = device_id
        self.context = keys.RoundContext(run_id, round_id)
        self._cipher_key = keys.new_private_key()
        self._mask_key = keys.new_private_key()
        self._self_seed = os.urandom(32)
        self._view: RosterView | None = None
        self._held: dict[str, tuple[Share, Share]] = {}  # sender -> (self-mask-seed share, mask-key share)
        self._masked_with: frozenset[str] = frozenset()
        self._unmasked = False

    def advertise(self) -> SecAggAdvertise:
        return SecAggAdvertise(self.context.run_id, self.context.round_id, self.device_id,
                               keys.public_bytes(self._cipher_key).hex(), keys.public_bytes(self._mask_key).hex())

    def _check_round(self, message: SecAggRoster | SecAggShareDelivery | SecAggUnmaskRequest) -> None:
        if (message.run_id, message.round_id, message.device_id) != (
                self.context.run_id, self.context.round_id, self.device_id):
            raise SecAggAborted("wrong_round", f"{type(message).__name__} for run {message.run_id!r} round "
                                f"{message.round_id} device {message.device_id!r}")

    def on_roster(self, roster: SecAggRoster) -> SecAggShares:
        """Share the self-mask seed and the mask key t-of-k among the neighbours, one ciphertext each."""
        self._check_round(roster)
        view = RosterView.from_roster(roster)
        own = (keys.public_bytes(self._cipher_key), keys.public_bytes(self._mask_key))
        if (view.cipher_keys.get(self.device_id), view.mask_keys.get(self.device_id)) != own:
            raise SecAggAborted("roster_mismatch", "the roster does not carry this device's advertised keys")
        neighbours = view.neighbours[self.device_id]
        if len(neighbours) < view.threshold:
            raise SecAggAborted("too_few_devices", f"{len(neighbours)} neighbours, threshold {view.threshold}")
        self._view = view
        points = [view.share_point[v] for v in neighbours]
        seed_shares = split_secret(self._self_seed, view.threshold, points)
        key_shares = split_secret(keys.private_bytes(self._mask_key), view.threshold, points)
        boxes = [keys.encrypt(view.channel_key(self._cipher_key, self.device_id, v),
                              seed.to_bytes() + key.to_bytes(), view.share_aad(self.device_id, v))
                 for v, seed, key in zip(neighbours, seed_shares, key_shares)]
        return SecAggShares(self.context.run_id, self.context.round_id, self.device_id, neighbours, b"".join(boxes))

    def on_delivery(self, delivery: SecAggShareDelivery, update: np.ndarray) -> SecAggMaskedInput:
        """Open the neighbours' shares, then mask the quantised ``update`` with them (and only them)."""
        self._check_round(delivery)
        view = self._require_view()
        strangers = set(delivery.senders) - set(view.neighbours[self.device_id])
        if strangers:
            raise SecAggAborted("not_a_neighbour", f"shares from non-neighbours {sorted(strangers)[:5]}")
        for i, sender in enumerate(delivery.senders):
            box = delivery.payload[i * SHARE_CIPHERTEXT_BYTES : (i + 1) * SHARE_CIPHERTEXT_BYTES]
            try:
                plain = keys.decrypt(view.channel_key(self._cipher_key, self.device_id, sender), box,
                                     view.share_aad(sender, self.device_id))
                self._held[sender] = (Share.from_bytes(plain[:SHARE_BYTES]), Share.from_bytes(plain[SHARE_BYTES:]))
            except WireError as exc:  # an altered share: the pair's masks could not cancel, so stop here
                raise SecAggAborted("share_auth_failed", f"share from {sender!r}: {exc}") from None
        vector = np.asarray(update, dtype=np.float64)
        if vector.shape != (view.num_params,):
            raise SecAggAborted("wrong_size", f"update has shape {vector.shape}, the round needs {view.num_params}")
        self._masked_with = frozenset(delivery.senders)
        pair_seeds = {v: view.pair_seed(self._mask_key, self.device_id, v) for v in sorted(self._masked_with)}
        masked = mask_input(view.fixed_point.quantise(vector), self.device_id, self._self_seed, pair_seeds,
                            view.fixed_point.ring_bits).astype("<u8").tobytes()
        tag = keys.mac(self._mac_key(), *view.mac_parts(self.device_id, "masked-input", masked))
        return SecAggMaskedInput(self.context.run_id, self.context.round_id, self.device_id, tag.hex(), masked)

    def on_unmask(self, request: SecAggUnmaskRequest) -> SecAggUnmaskShares:
        """Reveal self-mask shares of survivors and mask-key shares of dropouts: never both for one device,
        and only once per round (a second, different request could otherwise unmask someone)."""
        self._check_round(request)
        view = self._require_view()
        if self._unmasked:
            raise SecAggAborted("repeated_unmask", "this device already answered an unmask request this round")
        if self.device_id not in request.survivors:
            raise SecAggAborted("not_a_survivor", "the request does not list this device as a survivor")
        survivors = [v for v in request.survivors if v in self._held]
        dropped = [v for v in request.dropped if v in self._held]
        self._unmasked = True
        payload = b"".join([self._held[v][0].to_bytes() for v in survivors]
                           + [self._held[v][1].to_bytes() for v in dropped])
        owners = (",".join(survivors) + "|" + ",".join(dropped)).encode()
        tag = keys.mac(self._mac_key(), *view.mac_parts(self.device_id, "unmask", owners, payload))
        return SecAggUnmaskShares(self.context.run_id, self.context.round_id, self.device_id, tuple(survivors),
                                  tuple(dropped), tag.hex(), payload)

    def _require_view(self) -> RosterView:
        if self._view is None:
            raise SecAggAborted("out_of_order", "a later stage arrived before the roster")
        return self._view

    def _mac_key(self) -> bytes:
        view = self._require_view()
        return device_mac_key(self._cipher_key, view.server_public_key, self.context, self.device_id)
