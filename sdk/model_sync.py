"""The device's replica of the global model, kept in sync from round announcements.

An announcement carries either the whole model (``payload_kind="params"``) or the change since the
previous announced version (``"delta"``, with ``base_version``): sending the averaged update instead of
the model keeps the downlink cheap once it is compressed. A device applies a delta only on top of
exactly the version it was computed from; otherwise it is out of sync and asks for a full model
(``needs_resync``), which the aggregator sends with the next announcement. A payload that does not
decode, or decodes to NaN/Inf, is refused (WireError) and leaves the replica as it was.

On a device host the identities' replicas share one read-only vector per (run id, model version)
(``sdk.host_share.SharedModels``): whether a replica may move to a version is still decided from its own
version, exactly as on a board; only the arithmetic and the memory are shared.
"""
from __future__ import annotations

import numpy as np

from .errors import WireError
from .host_share import SharedModels
from .wire import Announcement


class ModelReplica:
    """The global parameters this device holds, and their version (None before the first model);
    ``shared``: a host's store of models, whose vectors this replica then refers to (read-only)."""

    def __init__(self, num_params: int, shared: SharedModels | None = None) -> None:
        self.num_params = num_params
        self.params: np.ndarray | None = None
        self.version: int | None = None
        self._shared = shared

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
        reachable = a.payload_kind == "params" or (
            a.payload_kind == "delta" and self.params is not None and self.version == a.base_version)
        if not reachable:
            return False
        known = None if self._shared is None else self._shared.get(a.run_id, a.model_version)
        if known is not None:  # another identity of this host already computed this version
            self.params, self.version = known, a.model_version
            return True
        if a.payload_kind == "params":
            params = self._decode(a)
        else:
            # float32 addition, exactly as the aggregator computed its copy: replicas stay bit-identical.
            params = (self.params + self._decode(a)).astype(np.float32)
            if not np.isfinite(params).all():  # finite delta, overflowing sum: as bad as a NaN model
                raise WireError(f"round {a.round_id}: the announced delta overflows the model; not applied")
        if self._shared is not None:
            params = self._shared.put(a.run_id, a.model_version, params)
        self.params, self.version = params, a.model_version
        return True
