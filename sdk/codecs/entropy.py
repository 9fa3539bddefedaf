"""How far an encoded update is from the entropy bound of what it carries.

An update's bytes split into a header, an index set (which entries are sent) and the values.
For ``k`` positions out of ``n`` the bound is ``log2 C(n, k)`` bits (every k-subset equally likely);
for the values it is the empirical zeroth-order entropy of the symbols actually sent (fp16 words,
quantisation levels, signs) times their count. Codecs expose ``account(data, size)``; the
benchmark prints each part's excess over its bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PayloadBits:
    """One payload's size split by role, next to the entropy bound of each role (all in bits)."""

    total_bits: int
    header_bits: int
    index_bits: int
    index_bound_bits: float
    value_bits: int
    value_bound_bits: float

    @property
    def index_excess(self) -> float:
        """Index bits over the bound, as a fraction of the bound (0 = at the bound)."""
        if self.index_bound_bits <= 0:
            return 0.0 if self.index_bits == 0 else math.inf
        return self.index_bits / self.index_bound_bits - 1.0


def index_set_bound_bits(size: int, count: int) -> float:
    """``log2 C(size, count)``: the fewest bits that can name one ``count``-subset of ``range(size)``."""
    if not 0 <= count <= size:
        raise ValueError(f"cannot choose {count} of {size}")
    return (math.lgamma(size + 1) - math.lgamma(count + 1) - math.lgamma(size - count + 1)) / math.log(2)


def empirical_entropy_bits(symbols: np.ndarray) -> float:
    """``count * H(p)`` where ``p`` is the symbols' own histogram (the zeroth-order bound a static
    entropy coder that knew that histogram could reach, ignoring the cost of sending it)."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    probs = counts / symbols.size
    return float(-(counts * np.log2(probs)).sum())
