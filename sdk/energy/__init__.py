"""Energy on the board: power sources (stdlib only), the windowed energy meter and per-round energy.

It lives in the SDK because a device measures every round on the sensors it has; ``device_bench``
builds its benchmark on top of it.
"""
