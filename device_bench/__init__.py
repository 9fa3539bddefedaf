"""device_bench: latency, memory, bytes and energy of training on one device.

Runs on the board, so nothing here imports torch: the bundle is driven through
``sdk.runtime.load_runtime``. Power sensors plug in behind ``device_bench.power.PowerSource``.
"""
