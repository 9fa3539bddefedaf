"""The update gate: every reject reason fires on its own cause, a good update passes, capping."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pytest

from edgetrain.aggregator import validation as v
from edgetrain.aggregator.validation import ValidationContext, validate_update
from edgetrain.sdk.codecs import get_codec
from edgetrain.sdk.errors import ConfigError, UpdateRejected, WireError
from edgetrain.sdk.wire import Update

NUM_PARAMS = 50


class _WrongShapeCodec:
    """A codec that decodes to one value too many: the aggregator must not trust codecs' shapes."""

    name = "test-wrong-shape"
    lossless = False

    def encode(self, vector: np.ndarray, state: Any, params: Mapping[str, Any]) -> tuple[bytes, Any]:
        return b"", state

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        return np.zeros(size + 1, dtype=np.float32)


_WRONG_SHAPE = _WrongShapeCodec()


@pytest.fixture(autouse=True)
def _wrong_shape_codec_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the test codec resolvable by the gate only, leaving sdk.codecs' global registry alone."""
    def lookup(name: str) -> Any:
        return _WRONG_SHAPE if name == _WRONG_SHAPE.name else get_codec(name)

    monkeypatch.setattr(v, "get_codec", lookup)


def _dense(vector: np.ndarray) -> bytes:
    payload, _ = get_codec("dense").encode(vector.astype(np.float32), None, {})
    return payload


def _vector() -> np.ndarray:
    return np.linspace(-0.5, 0.5, NUM_PARAMS, dtype=np.float32)


def _update(**overrides: Any) -> Update:
    fields: dict[str, Any] = dict(device_id="dev-1", round_id=7, model_version=3, update_id="u-1",
                                  num_examples=120, codec="dense", payload=_dense(_vector()), metrics={},
                                  run_id="run-1")
    fields.update(overrides)
    return Update(**fields)


def _ctx(**overrides: Any) -> ValidationContext:
    fields: dict[str, Any] = dict(round_id=7, model_version=3, selected=frozenset({"dev-1", "dev-2"}),
                                  num_params=NUM_PARAMS, run_id="run-1")
    fields.update(overrides)
    return ValidationContext(**fields)


def test_good_update_passes_and_is_decoded() -> None:
    ctx = _ctx(max_norm=100.0, max_examples=1000, allowed_codecs=frozenset({"dense"}))
    accepted = validate_update(_update(), topic_device="dev-1", ctx=ctx)
    np.testing.assert_array_equal(accepted.vector, _vector())
    assert accepted.vector.dtype == np.float32
    assert accepted.num_examples == 120 and accepted.claimed_examples == 120 and not accepted.capped
    assert accepted.norm == pytest.approx(float(np.linalg.norm(_vector().astype(np.float64))))
    assert accepted.device_id == "dev-1" and accepted.update_id == "u-1"
    assert ctx.seen_update_ids == set() and ctx.reported_devices == set()  # validation does not mark


def _seen(ctx: ValidationContext) -> ValidationContext:
    ctx.seen_update_ids.add("u-1")
    return ctx


def _reported(ctx: ValidationContext) -> ValidationContext:
    ctx.reported_devices.add("dev-1")
    return ctx


_same = lambda ctx: ctx  # noqa: E731
_nan_payload = _dense(np.where(np.arange(NUM_PARAMS) == 3, np.nan, _vector()))
_inf_payload = _dense(np.where(np.arange(NUM_PARAMS) == 9, -np.inf, _vector()))

# (reason, update overrides, topic device, context overrides, context mutation)
CASES: list[tuple[str, dict[str, Any], str, dict[str, Any], Callable[[ValidationContext], ValidationContext]]] = [
    (v.REJECT_SPOOFED_SENDER, {}, "dev-2", {}, _same),
    (v.REJECT_WRONG_RUN, dict(run_id="run-0"), "dev-1", {}, _same),  # same round and version, earlier run
    (v.REJECT_UNKNOWN_DEVICE, dict(device_id="dev-9"), "dev-9", {}, _same),
    (v.REJECT_LATE, dict(round_id=6), "dev-1", {}, _same),
    (v.REJECT_WRONG_ROUND, dict(round_id=8), "dev-1", {}, _same),
    (v.REJECT_WRONG_MODEL_VERSION, dict(model_version=2), "dev-1", {}, _same),
    (v.REJECT_DUPLICATE, {}, "dev-1", {}, _seen),
    # accepted in round 6, re-sent in round 7 because its ack was lost: held, not late
    (v.REJECT_DUPLICATE, dict(round_id=6, model_version=2), "dev-1", {}, _seen),
    (v.REJECT_DUPLICATE, dict(update_id="u-2"), "dev-1", {}, _reported),
    (v.REJECT_BAD_EXAMPLE_COUNT, dict(num_examples=0), "dev-1", {}, _same),
    (v.REJECT_UNKNOWN_CODEC, dict(codec="nope"), "dev-1", {}, _same),
    (v.REJECT_UNKNOWN_CODEC, dict(codec="dense:k"), "dev-1", {}, _same),
    (v.REJECT_UNKNOWN_CODEC, {}, "dev-1", dict(allowed_codecs=frozenset({"sketch"})), _same),
    (v.REJECT_UNDECODABLE, dict(payload=_dense(_vector())[:-3]), "dev-1", {}, _same),
    (v.REJECT_WRONG_SHAPE, dict(codec="test-wrong-shape"), "dev-1", {}, _same),
    (v.REJECT_NON_FINITE, dict(payload=_nan_payload), "dev-1", {}, _same),
    (v.REJECT_NON_FINITE, dict(payload=_inf_payload), "dev-1", {}, _same),
    (v.REJECT_NORM_TOO_LARGE, {}, "dev-1", dict(max_norm=0.5), _same),
    # FedBuff: 3 versions behind, one more than max_staleness allows (round and version stay in step)
    (v.REJECT_TOO_STALE, dict(round_id=4, model_version=0), "dev-1", dict(max_staleness=2), _same),
    # metrics are wire numbers too: checked before they are summed into the round's record
    (v.REJECT_BAD_METRICS, dict(metrics={"cpu_s": float("nan")}), "dev-1", {}, _same),
    (v.REJECT_BAD_METRICS, dict(metrics={"loss": float("inf")}), "dev-1", {}, _same),
    (v.REJECT_BAD_METRICS, dict(metrics={"cpu_s": -1.0}), "dev-1", {}, _same),
    (v.REJECT_BAD_METRICS, dict(metrics={"cpu_s": 1e300}), "dev-1", {}, _same),
    (v.REJECT_BAD_METRICS, dict(metrics={f"m{i}": 1.0 for i in range(v.MAX_METRICS + 1)}), "dev-1", {}, _same),
]


@pytest.mark.parametrize("reason, update_kw, topic, ctx_kw, mutate", CASES)
def test_each_reason_is_raised_for_its_cause(reason: str, update_kw: dict, topic: str, ctx_kw: dict,
                                             mutate: Callable[[ValidationContext], ValidationContext]) -> None:
    ctx = mutate(_ctx(**ctx_kw))
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(**update_kw), topic_device=topic, ctx=ctx)
    assert caught.value.reason == reason
    assert caught.value.detail  # a human-readable explanation travels with the code
    # The same update with the cause removed is accepted: the reason was not a side effect.
    validate_update(_update(), topic_device="dev-1", ctx=_ctx())


def test_every_reason_code_is_covered() -> None:
    assert {case[0] for case in CASES} == set(v.REJECT_REASONS)
    assert len(set(v.REJECT_REASONS)) == len(v.REJECT_REASONS)


def test_examples_are_capped_not_rejected() -> None:
    accepted = validate_update(_update(num_examples=5000), topic_device="dev-1", ctx=_ctx(max_examples=600))
    assert accepted.capped and accepted.num_examples == 600 and accepted.claimed_examples == 5000
    at_cap = validate_update(_update(num_examples=600), topic_device="dev-1", ctx=_ctx(max_examples=600))
    assert not at_cap.capped and at_cap.num_examples == 600


def test_mark_accepted_turns_a_redelivery_into_a_duplicate() -> None:
    ctx = _ctx()
    update = _update()
    validate_update(update, topic_device="dev-1", ctx=ctx)
    ctx.mark_accepted(update)
    assert ctx.pending_devices() == frozenset({"dev-2"})
    with pytest.raises(UpdateRejected) as caught:
        validate_update(update, topic_device="dev-1", ctx=ctx)
    assert caught.value.reason == v.REJECT_DUPLICATE
    # A different device is still welcome.
    other = validate_update(_update(device_id="dev-2", update_id="u-7"), topic_device="dev-2", ctx=ctx)
    assert other.device_id == "dev-2"


def test_a_rejected_update_does_not_block_a_correct_retry() -> None:
    ctx = _ctx()
    with pytest.raises(UpdateRejected):
        validate_update(_update(payload=_nan_payload), topic_device="dev-1", ctx=ctx)
    retry = validate_update(_update(update_id="u-1b"), topic_device="dev-1", ctx=ctx)
    assert retry.update_id == "u-1b"


def test_huge_but_finite_values_get_a_finite_norm() -> None:
    big = np.full(NUM_PARAMS, 3e38, dtype=np.float32)  # a float32 sum of squares would overflow
    accepted = validate_update(_update(payload=_dense(big)), topic_device="dev-1", ctx=_ctx())
    assert np.isfinite(accepted.norm)
    with pytest.raises(UpdateRejected) as caught:
        validate_update(_update(payload=_dense(big)), topic_device="dev-1", ctx=_ctx(max_norm=1e30))
    assert caught.value.reason == v.REJECT_NORM_TOO_LARGE


def test_wire_error_from_the_codec_is_undecodable_not_a_crash() -> None:
    with pytest.raises(WireError):  # the codec itself refuses the bytes...
        get_codec("dense").decode(b"\x00" * 7, NUM_PARAMS, {})
    with pytest.raises(UpdateRejected) as caught:  # ...and the gate turns that into a reason code
        validate_update(_update(payload=b"\x00" * 7), topic_device="dev-1", ctx=_ctx())
    assert caught.value.reason == v.REJECT_UNDECODABLE


@pytest.mark.parametrize("bad", [dict(num_params=0), dict(max_norm=0.0), dict(max_examples=0)])
def test_context_is_validated(bad: dict) -> None:
    with pytest.raises(ConfigError):
        _ctx(**bad)

