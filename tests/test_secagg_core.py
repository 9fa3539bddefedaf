"""The pure SecAgg core: quantisation, masks, Shamir sharing, key agreement, the neighbour graph."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from edgetrain.sdk.errors import ConfigError, WireError
from edgetrain.sdk.secagg import keys
from edgetrain.sdk.secagg.graph import neighbour_graph
from edgetrain.sdk.secagg.masking import add_mask, mask_input
from edgetrain.sdk.secagg.prg import expand_mask
from edgetrain.sdk.secagg.quantize import FixedPoint
from edgetrain.sdk.secagg.shamir import PRIME, Share, combine_shares, split_secret


def test_ring_bits_leave_room_for_the_sum_and_refuse_overflow() -> None:
    assert FixedPoint(1.0, 16, 10).ring_bits == 16 + 4
    assert FixedPoint(1.0, 16, 16).ring_bits == 16 + 4
    assert FixedPoint(1.0, 16, 17).ring_bits == 16 + 5
    with pytest.raises(ConfigError, match="overflow"):
        FixedPoint(1.0, 60, 1000)
    with pytest.raises(ConfigError, match="clip"):
        FixedPoint(float("nan"), 16, 10)


def test_sum_of_max_devices_extreme_inputs_does_not_wrap() -> None:
    fp = FixedPoint(1.0, 8, 5)
    top = fp.quantise(np.ones(3))
    total = (top * np.uint64(5)) & fp.ring_mask
    np.testing.assert_allclose(fp.dequantise_sum(total, 5), 5.0 * np.ones(3), atol=fp.sum_error_bound(5))


def test_dequantised_sum_is_within_the_stated_bound_and_the_bound_is_tight() -> None:
    rng = np.random.default_rng(0)
    fp = FixedPoint(0.5, 12, 20)
    vectors = rng.uniform(-0.5, 0.5, size=(20, 4000))
    total = sum(fp.quantise(v) for v in vectors) & fp.ring_mask
    error = np.abs(fp.dequantise_sum(total, 20) - vectors.sum(axis=0))
    assert error.max() <= fp.sum_error_bound(20)
    assert error.max() > fp.sum_error_bound(20) / 20  # the bound is not vacuous: errors of this order occur


def test_masks_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    seed = os.urandom(32)
    a = expand_mask(seed, 1000, 20)
    np.testing.assert_array_equal(a, expand_mask(seed, 1000, 20))
    assert a.max() < 1 << 20
    assert not np.array_equal(a, expand_mask(os.urandom(32), 1000, 20))
    with pytest.raises(ConfigError):
        expand_mask(b"short", 10, 20)


def test_pairwise_masks_cancel_and_self_masks_come_off() -> None:
    fp = FixedPoint(1.0, 16, 4)
    devices = ["a", "b", "c", "d"]
    mask_keys = {d: keys.new_private_key() for d in devices}
    context = keys.RoundContext("run", 3)
    rng = np.random.default_rng(1)
    inputs = {d: fp.quantise(rng.uniform(-1, 1, 50)) for d in devices}
    self_seeds = {d: os.urandom(32) for d in devices}
    total = np.zeros(50, dtype=np.uint64)
    for d in devices:
        pair_seeds = {o: keys.derive(mask_keys[d], keys.public_bytes(mask_keys[o]), context, "mask",
                                     *sorted((d, o))) for o in devices if o != d}
        total += mask_input(inputs[d], d, self_seeds[d], pair_seeds, fp.ring_bits)
    for d in devices:
        add_mask(total, self_seeds[d], -1, fp.ring_bits)
    np.testing.assert_array_equal(total & fp.ring_mask, sum(inputs.values()) & fp.ring_mask)


@pytest.mark.parametrize("threshold,n", [(1, 3), (3, 5), (5, 9)])
def test_any_threshold_shares_reconstruct_and_fewer_do_not(threshold: int, n: int) -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, threshold, list(range(1, n + 1)))
    for subset in itertools.combinations(shares, threshold):
        assert combine_shares(list(subset), threshold) == secret
    if threshold > 1:
        with pytest.raises(ConfigError, match="cannot reconstruct"):
            combine_shares(shares[: threshold - 1], threshold)
        # Interpolating t-1 points as if they were enough gives something other than the secret.
        try:
            wrong = combine_shares(shares[: threshold - 1], threshold - 1)
        except ConfigError:
            wrong = None
        assert wrong != secret


def test_a_tampered_share_does_not_reconstruct_the_secret() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, [1, 2, 3])
    bad = Share(shares[0].x, (shares[0].y + 1) % PRIME)
    try:
        result = combine_shares([bad, shares[1], shares[2]], 3)
    except ConfigError:
        result = None
    assert result != secret


def test_share_bytes_round_trip_and_bad_bytes_are_refused() -> None:
    share = split_secret(os.urandom(32), 2, [7, 9])[0]
    assert Share.from_bytes(share.to_bytes()) == share
    with pytest.raises(WireError, match="bad share"):
        Share.from_bytes(share.to_bytes()[:-1])
    with pytest.raises(WireError, match="bad share"):
        Share.from_bytes(bytes(2) + share.to_bytes()[2:])  # x = 0 is the secret's own point


def test_key_agreement_is_symmetric_and_bound_to_purpose_and_round() -> None:
    a, b = keys.new_private_key(), keys.new_private_key()
    ctx = keys.RoundContext("run", 1)
    ab = keys.derive(a, keys.public_bytes(b), ctx, "mask", "a", "b")
    assert ab == keys.derive(b, keys.public_bytes(a), ctx, "mask", "a", "b")
    assert ab != keys.derive(a, keys.public_bytes(b), ctx, "channel", "a", "b")
    assert ab != keys.derive(a, keys.public_bytes(b), keys.RoundContext("run", 2), "mask", "a", "b")


def test_aead_detects_tampering_with_ciphertext_or_routing() -> None:
    key = os.urandom(32)
    box = keys.encrypt(key, b"share bytes", b"from a to b")
    assert keys.decrypt(key, box, b"from a to b") == b"share bytes"
    flipped = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(WireError, match="authentication failed"):
        keys.decrypt(key, flipped, b"from a to b")
    with pytest.raises(WireError, match="authentication failed"):
        keys.decrypt(key, box, b"from c to b")


@pytest.mark.parametrize("n,k", [(10, 4), (11, 6), (100, 8), (5, 4), (5, 10)])
def test_neighbour_graph_is_symmetric_k_regular_and_agreed(n: int, k: int) -> None:
    devices = [f"dev-{i}" for i in range(n)]
    graph = neighbour_graph(devices, k, b"seed")
    degree = min(k, n - 1)
    for device, neighbours in graph.items():
        assert len(neighbours) == degree and device not in neighbours
        assert all(device in graph[other] for other in neighbours)
    assert graph == neighbour_graph(list(reversed(devices)), k, b"seed")
    if k < n - 1:
        assert graph != neighbour_graph(devices, k, b"another seed")


def test_neighbour_graph_refuses_odd_sparse_degree() -> None:
    with pytest.raises(ConfigError, match="even"):
        neighbour_graph([str(i) for i in range(10)], 3, b"s")
