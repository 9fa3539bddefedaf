"""The ``dense`` codec: the vector's raw float32 bytes, little-endian. Lossless; the baseline every
compressing codec is measured against."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import WireError
from .params import KnobParams

# Explicit little-endian so big-endian peers read the same numbers.
_WIRE_DTYPE = np.dtype("<f4")


class DenseCodec(KnobParams):
    """Raw float32 little-endian; stateless (any state passed in is handed back unchanged)."""

    name = "dense"
    lossless = True

    def encode(
        self, vector: np.ndarray, state: dict[str, np.ndarray] | None, params: Mapping[str, Any]
    ) -> tuple[bytes, dict[str, np.ndarray] | None]:
        # Any byte order of float32 is fine: the bytes are written little-endian either way.
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.newbyteorder("=") != np.float32:
            raise WireError(
                f"dense codec: expected a 1-D float32 vector, got {getattr(vector, 'dtype', type(vector).__name__)} "
                f"with shape {getattr(vector, 'shape', '?')}"
            )
        return vector.astype(_WIRE_DTYPE, copy=False).tobytes(), state

    def decode(self, data: bytes, size: int, params: Mapping[str, Any]) -> np.ndarray:
        # astype copies: the result is writable and does not pin the frame's buffer.
        return self.decode_view(data, size, params).astype(np.float32)

    def decode_view(self, data: bytes | memoryview, size: int, params: Mapping[str, Any]) -> np.ndarray:
        """The values as a read-only float32 view of ``data`` (no copy on a little-endian host): the
        aggregator's validation reads them once, widening them for the norm, and keeps no other copy."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise WireError(f"dense codec: size must be a non-negative int, got {size!r}")
        expected = 4 * int(size)
        if len(data) != expected:
            raise WireError(f"dense codec: {len(data)} bytes for {size} float32 values (expected {expected})")
        view = np.frombuffer(data, dtype=_WIRE_DTYPE).astype(np.float32, copy=False)  # copies only if big-endian
        if not view.flags.aligned:  # frames align their payload (wire.frame); other buffers may not
            view = view.copy()  # one memcpy: numpy and BLAS then run their aligned (vector) loops
        view.flags.writeable = False
        return view

    def __repr__(self) -> str:
        return "DenseCodec()"
