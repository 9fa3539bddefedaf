"""What the aggregator announces: the whole model, or the change since the last announcement.

Devices hold a replica of the announced model (``sdk.model_sync``). A full model goes out on the first
announcement, every ``resync_every`` versions, and after a device joins or asks for a resync; otherwise
the delta from the devices' replica (the "shadow") to the new parameters. With a lossless codec the
aggregator adopts ``shadow + delta`` as its parameters, so server and devices hold bit-identical models;
a lossy codec keeps the server's exact parameters and carries the difference into the next delta
(error feedback on the downlink).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgetrain.sdk.codecs import CodecSpec
from edgetrain.sdk.errors import ConfigError, UnknownCodec

_DENSE = CodecSpec("dense")


@dataclass(frozen=True)
class DownlinkPayload:
    """What one announcement carries: its ``payload_kind``, ``base_version`` and ``downlink_codec``."""

    payload_kind: str  # "params" | "delta"
    codec: CodecSpec
    payload: bytes
    base_version: int | None


class Downlink:
    def __init__(self, resync_every: int = 1, codec: str = "dense",
                 shapes: Sequence[tuple[int, ...]] | None = None) -> None:
        """``shapes``: the model's parameter shapes (manifest order), for codecs that need them (low_rank)."""
        if resync_every < 1:
            raise ConfigError(f"resync_every must be >= 1, got {resync_every}")
        self.resync_every = resync_every
        try:
            spec = CodecSpec.parse(codec)
        except UnknownCodec as exc:  # configuration, not a frame: refuse it as such
            raise ConfigError(str(exc)) from None
        self.spec = spec.with_layout(shapes) if shapes is not None else spec  # what announcements say
        self.codec = str(self.spec)
        self._params = self.spec.params
        self._codec = self.spec.codec
        self.shadow: np.ndarray | None = None  # the model the devices hold
        self.shadow_version: int | None = None
        self.resync_requested = True
        self._last: tuple[int, DownlinkPayload] | None = None

    def request_resync(self) -> None:
        self.resync_requested = True

    def announce(self, params: np.ndarray, version: int) -> tuple[DownlinkPayload, np.ndarray]:
        """The payload for ``version`` and the parameters the server should continue from."""
        if self._last is not None and self._last[0] == version and not self.resync_requested:
            return self._last[1], params  # a retried round re-sends the same thing
        full = (self.shadow is None or self.resync_requested or version % self.resync_every == 0)
        if full:
            # A version names one model: re-announcing one devices may already hold (a retried round after
            # a resync request) sends that model, since devices keep a version they already have. Only
            # a lossy delta makes it differ from ``params``; the next delta carries the difference.
            same_version = self.shadow is not None and self.shadow_version == version
            model = self.shadow if same_version else params.copy()
            payload = DownlinkPayload("params", _DENSE, _DENSE.codec.encode(model, None, {})[0], None)
            self.shadow, self.shadow_version = model, version
            self.resync_requested = False
        else:
            assert self.shadow is not None
            data, _ = self._codec.encode((params - self.shadow).astype(np.float32), None, self._params)
            sent = self._codec.decode(data, params.size, self._params)
            payload = DownlinkPayload("delta", self.spec, data, self.shadow_version)
            self.shadow = (self.shadow + sent).astype(np.float32)
            self.shadow_version = version
            if self._codec.lossless:
                params = self.shadow.copy()
        self._last = (version, payload)
        return payload, params
