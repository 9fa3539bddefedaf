"""What both ends of a SecAgg+ round derive alike from the roster: the graph, keys, share points, MAC inputs."""
from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..wire.secagg import SecAggRoster
from . import keys
from .graph import neighbour_graph
from .quantize import FixedPoint


@dataclass(frozen=True)
class RosterView:
    """A roster decoded once: every device's public keys, its neighbours, its share point (index + 1)."""

    context: keys.RoundContext
    devices: tuple[str, ...]
    cipher_keys: dict[str, bytes]
    mask_keys: dict[str, bytes]
    neighbours: dict[str, tuple[str, ...]]
    share_point: dict[str, int]
    threshold: int
    fixed_point: FixedPoint
    num_params: int
    server_public_key: bytes

    @classmethod
    def from_roster(cls, roster: SecAggRoster) -> RosterView:
        cipher, mask = {}, {}
        for i, device in enumerate(roster.devices):
            chunk = roster.payload[64 * i : 64 * (i + 1)]
            cipher[device], mask[device] = chunk[:32], chunk[32:]
        return cls(
            context=keys.RoundContext(roster.run_id, roster.round_id), devices=roster.devices,
            cipher_keys=cipher, mask_keys=mask,
            neighbours=neighbour_graph(roster.devices, roster.neighbours, bytes.fromhex(roster.graph_seed)),
            share_point={d: i + 1 for i, d in enumerate(roster.devices)}, threshold=roster.threshold,
            fixed_point=FixedPoint(roster.clip, roster.value_bits, roster.max_devices),
            num_params=roster.num_params, server_public_key=bytes.fromhex(roster.server_public_key))

    def share_aad(self, sender: str, recipient: str) -> bytes:
        """Associated data of a share ciphertext: the round and the route, so a rerouted one fails to open."""
        return self.context.info("share-route", sender, recipient)

    def channel_key(self, own_cipher_key: X25519PrivateKey, own: str, peer: str) -> bytes:
        return keys.derive(own_cipher_key, self.cipher_keys[peer], self.context, "channel", *sorted((own, peer)))

    def pair_seed(self, own_mask_key: X25519PrivateKey, own: str, peer: str) -> bytes:
        return keys.derive(own_mask_key, self.mask_keys[peer], self.context, "mask", *sorted((own, peer)))

    def mac_parts(self, device: str, stage: str, *parts: bytes) -> tuple[bytes, ...]:
        return (self.context.info("mac", stage, device), *parts)


def device_mac_key(device_cipher_key: X25519PrivateKey, server_public_key: bytes, context: keys.RoundContext,
                   device: str) -> bytes:
    """The key a device MACs its masked input and unmask shares with; the server derives it from its side."""
    return keys.derive(device_cipher_key, server_public_key, context, "server-mac", device)


def server_mac_key(server_key: X25519PrivateKey, device_cipher_public: bytes, context: keys.RoundContext,
                   device: str) -> bytes:
    return keys.derive(server_key, device_cipher_public, context, "server-mac", device)
