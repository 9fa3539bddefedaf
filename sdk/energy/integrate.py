"""Energy from a power trace: the trapezoidal rule over samples, clipped to a window.

Edges are linearly interpolated between neighbouring samples, so a window need not start or end on
a sample and back-to-back windows add up to their union exactly (what per-step energy needs).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence


def interpolate(times_s: Sequence[float], watts: Sequence[float], t: float) -> float:
    """Power at ``t``: linear between the samples around it, held flat beyond the ends."""
    if t <= times_s[0]:
        return watts[0]
    if t >= times_s[-1]:
        return watts[-1]
    i = bisect_right(times_s, t)
    t_a, t_b = times_s[i - 1], times_s[i]
    if t_b == t_a:
        return watts[i]
    return watts[i - 1] + (watts[i] - watts[i - 1]) * (t - t_a) / (t_b - t_a)


def trapezoid_j(times_s: Sequence[float], watts: Sequence[float], start_s: float, end_s: float) -> tuple[float, int]:
    """Joules between ``start_s`` and ``end_s`` and how many samples fell strictly inside.

    ``times_s`` must be sorted. Outside the trace's span the nearest sample is held, so callers
    should check coverage (``covered_fraction``) before trusting a window near the ends.
    """
    if not times_s:
        raise ValueError("empty trace")
    if end_s < start_s:
        raise ValueError(f"window ends ({end_s}) before it starts ({start_s})")
    lo, hi = bisect_right(times_s, start_s), bisect_left(times_s, end_s)
    points_t = [start_s, *times_s[lo:hi], end_s]
    points_w = [interpolate(times_s, watts, start_s), *watts[lo:hi], interpolate(times_s, watts, end_s)]
    joules = sum((points_w[k] + points_w[k + 1]) * 0.5 * (points_t[k + 1] - points_t[k])
                 for k in range(len(points_t) - 1))
    return joules, max(hi - lo, 0)


def covered_fraction(times_s: Sequence[float], start_s: float, end_s: float) -> float:
    """Share of ``[start_s, end_s]`` lying between the first and last sample (1.0: fully covered)."""
    if not times_s:
        return 0.0
    if end_s == start_s:
        return 1.0 if times_s[0] <= start_s <= times_s[-1] else 0.0
    inside = max(0.0, min(end_s, times_s[-1]) - max(start_s, times_s[0]))
    return inside / (end_s - start_s)
