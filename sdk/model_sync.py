"""The device's replica of the global model, kept in sync from round announcements.

An announcement carries either the whole model (``payload_kind="params"``) or the change since the
previous announced version (``"delta"``, with ``base_version``): sending the averaged update instead of
the model keeps the downlink cheap once it is compressed. A device applies a delta only on top of
exactly the version it was computed from; otherwise it is out of sync and asks for a full model
(``needs_resync``), which the aggregator sends with the next announcement. A payload that does not
decode, or decodes to NaN/Inf, is refused (WireError) and leaves the replica as it was.
"""
from __future__ import annotations

import numpy as np

from .errors import WireError
from .wire import Announcement


class ModelReplica:
    """The global parameters this device holds, and their version (None before the first model)."""

    def __init__(self, num_params: int) -> None:
        self.num_params = num_params
        self.params: np.ndarray | None = None
        self.version: int | None = None

    def reset(self) -> None:
        """Forget the model (a new run numbers its versions from 0 again)."""
        self.params, self.version = None, None

    def _decode(self, a: Announcement) -> np.ndarray:
        spec = a.downlink_codec
        vector = spec.codec.decode(a.payload, self.num_params, spec.params)
        if vector.shape != (self.num_params,) or not np.isfinite(vector).all():
            raise WireError(f"round {a.round_id}: the announced {a.payload_kind} ({spec}) holds NaN or Inf "
                            "or has the wrong size; not applied")
        return vector

    def apply(self, a: Announcement) -> bool:
        """Bring the replica to ``a.model_version``; False when that is impossible without a resync.
        WireError when the payload does not decode to a finite vector (the replica is unchanged)."""
        if self.version == a.model_version and self.params is not None:
            return True  # already there (a retained announcement seen again, or a retried round)
        if a.payload_kind == "params":
            self.params = self._decode(a)
            self.version = a.model_version
            return True
        if a.payload_kind == "delta" and self.params is not None and self.version == a.base_version:
            # float32 addition, exactly as the aggregator computed its copy: replicas stay bit-identical.
            params = (self.params + self._decode(a)).astype(np.float32)
            if not np.isfinite(params).all():  # finite delta, overflowing sum: as bad as a NaN model
                raise WireError(f"round {a.round_id}: the announced delta overflows the model; not applied")
            self.params, self.version = params, a.model_version
            return True
        return False
