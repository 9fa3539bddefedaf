"""A device's part in one secure FedAvg round: its update goes out masked (SecAgg+, Bonawitz et al. CCS 2017;
Bell et al. CCS 2020) instead of as an ``Update`` the aggregator could read.

``Device`` trains as in any round, encodes and decodes the delta with the round's codec (so the values summed
are the ones a plain update would carry: q8's quantisation included), then hands the vector to a
``SecureDeviceRound``: it advertises, answers the roster, the share delivery and the unmask request as they
arrive on the device's ``secagg-in`` topic, and reports when the device's part is over. No outbox: a device
that crashes mid-round is a dropout, which the protocol is built to survive.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import ConfigError
from ..transport.base import Transport
from .client import SecAggClient
from .session import SecAggDeviceSession

_log = logging.getLogger(__name__)

# Uplink codecs whose decoded updates are dense vectors that add up (the masks add to every value). Sparsifying
# codecs (dgc, stc, random_mask, sketch, low_rank) send different coordinates or a projection per device and
# carry error-feedback state built on the server seeing each update: their masked sum means nothing.
SUMMABLE_CODECS = ("dense", "fp16", "q8")

# Test hook: "dev-3=masked_input,dev-5=shares" makes dev-3 go silent right after sending its masked input and
# dev-5 right after sending its shares (before its masked input), as if killed there.
STOP_AFTER_ENV = "EDGETRAIN_TEST_SECAGG_STOP_AFTER"
STAGE_SENT_BY = {"advertise": "", "shares": "SecAggRoster", "masked_input": "SecAggShareDelivery",
                 "unmask": "SecAggUnmaskRequest"}  # our message -> the server message it answers


def check_summable_codec(codec_name: str) -> None:
    """ConfigError unless updates in ``codec_name`` can be summed under masks."""
    if codec_name not in SUMMABLE_CODECS:
        raise ConfigError(f"secure aggregation needs a dense uplink codec ({', '.join(SUMMABLE_CODECS)}): "
                          f"{codec_name!r} sparsifies or projects each update differently, so the masked sum of "
                          "its payloads is not the sum of the updates")


def _stop_after(device_id: str) -> str:
    for item in os.environ.get(STOP_AFTER_ENV, "").split(","):
        device, _, stage = item.partition("=")
        if device.strip() == device_id and stage.strip() in STAGE_SENT_BY:
            return stage.strip()
    return ""


class SecureDeviceRound:
    """One secure round of one device: ``start`` advertises, ``receive`` takes each ``secagg-in`` frame."""

    def __init__(self, transport: Transport, fleet: str, device_id: str, run_id: str, round_id: int,
                 update: np.ndarray) -> None:
        self.round_id = round_id
        self._update = np.asarray(update, dtype=np.float64)
        self.session = SecAggDeviceSession(transport, fleet, SecAggClient(device_id, run_id, round_id),
                                           lambda: self._update, subscribe=False)
        self._stop_after = _stop_after(device_id)
        self.silenced = False  # the test hook fired: this device acts as if killed

    def start(self) -> None:
        self.session.start()
        self._check_hook("advertise")

    def receive(self, payload: bytes) -> None:
        if self.silenced or self.finished:
            return
        self.session.receive(payload)
        self.session.pump()
        for stage, answered in STAGE_SENT_BY.items():
            if answered and answered in self.session.stages_done:
                self._check_hook(stage)

    def _check_hook(self, stage: str) -> None:
        if self._stop_after == stage and not self.silenced:
            _log.warning("round %d: test hook %s: silent after sending %s", self.round_id, STOP_AFTER_ENV, stage)
            self.silenced = True

    @property
    def completed(self) -> bool:
        """The device sent its unmask shares: its part of the round is done."""
        return "SecAggUnmaskRequest" in self.session.stages_done

    @property
    def finished(self) -> bool:
        return self.completed or bool(self.session.aborted)
