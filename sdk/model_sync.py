"""The device's replica of the global model, kept in sync from round announcements.

An announcement carries either the whole model (``payload_kind="params"``) or the change since the
previous announced version (``"delta"``, with ``hyperparams["base_version"]``): sending the averaged
update instead of the model keeps the downlink cheap once it is compressed. A device applies a delta
only on top of exactly the version it was computed from; otherwise it is out of sync and asks for a
full model (``needs_resync``), which the aggregator sends with the next announcement.
"""
from __future__ import annotations

import numpy as np

from .codecs import get_codec, parse_codec_spec
from .wire import Announcement


class ModelReplica:
    """The global parameters this device holds, and their version (None before the first model)."""

    def __init__(self, num_params: int) -> None:
        self.num_params = num_params
        self.params: np.ndarray | None = None
        self.version: int | None = None

    def _decode(self, a: Announcement) -> np.ndarray:
        name, params = parse_codec_spec(a.codec)
        return get_codec(name).decode(a.payload, self.num_params, params)

    def apply(self, a: Announcement) -> bool:
        """Bring the replica to ``a.model_version``; False when that is impossible without a resync."""
        if self.version == a.model_version and self.params is not None:
            return True  # already there (a retained announcement seen again, or a retried round)
        if a.payload_kind == "params":
            self.params = self._decode(a)
            self.version = a.model_version
            return True
        if a.payload_kind == "delta" and self.params is not None and self.version == a.hyperparams.get("base_version"):
            # float32 addition, exactly as the aggregator computed its copy: replicas stay bit-identical.
            self.params = (self.params + self._decode(a)).astype(np.float32)
            self.version = a.model_version
            return True
        return False
