"""device_bench: latency, memory, bytes and energy of training on one device.

Runs on the board, so nothing here imports torch: the bundle is driven through
``edgetrain.sdk.runtime.load_runtime``. Power sensors (``edgetrain.sdk.energy.power``) live in the SDK,
which a device also measures its rounds with.
"""
