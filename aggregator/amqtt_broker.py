"""Run an embedded amqtt broker (pure Python, MQTT 3.1.1 only) on 127.0.0.1:PORT until SIGTERM.

``python -m edgetrain.aggregator.amqtt_broker --port N``: the fallback that ``simulate`` starts when no
Mosquitto is installed. A process of its own, so the broker's asyncio loop never competes with
the aggregator's threads and the devices still talk to a separate process, as in a deployment.
No persistence on disk: sessions live as long as the process. Loopback only, no passwords.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass

# Only ever run as the broker process (local_broker starts it), so importing amqtt here is fine.
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from edgetrain.aggregator.local_broker import READY_LINE


def broker_config(port: int) -> dict[str, object]:
    """amqtt's config: one loopback TCP listener, our trusting auth plugin, no $SYS publisher, no
    packet logger (it would format every multi-megabyte update frame)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {f"{__name__}.LoopbackAuthPlugin": {}},
    }


class LoopbackAuthPlugin(BaseAuthPlugin):
    """Accept every client without marking it anonymous: amqtt's AnonymousAuthPlugin does mark
    sessions anonymous, and amqtt queues no QoS 1 message for an offline anonymous session, which
    would break our persistent sessions (a device that reconnects mid-round)."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool:
        return True


async def serve(port: int) -> None:
    broker = Broker(broker_config(port))
    await broker.start()
    print(f"{READY_LINE} 127.0.0.1:{port}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetrain.aggregator.amqtt_broker", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s amqtt %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
