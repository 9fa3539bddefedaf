"""Shared fixtures: private Mosquitto brokers and TLS material (see tests/mosquitto.py).

Tests that use ``broker`` or ``broker_factory`` are marked ``broker`` automatically, so
``pytest -m "not broker"`` runs everything that needs no Mosquitto.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.mosquitto import MosquittoBroker, TlsMaterial, make_tls_material

_BROKER_FIXTURES = {"broker", "broker_factory", "module_broker"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """``broker_factory(**kwargs)`` starts a MosquittoBroker in its own tmp folder; all are
    killed after the test."""
    started: list[MosquittoBroker] = []

    def make(**kwargs: object) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"broker{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.kill()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A plain anonymous broker with persistence, private to one test."""
    return broker_factory()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker shared by a module's tests, for runs cached across them (each uses its own fleet name)."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("module-broker"))
    yield broker
    broker.kill()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A CA, a server certificate for 127.0.0.1/localhost, client certs for device-1/device-2."""
    return make_tls_material(tmp_path_factory.mktemp("tls"), ("device-1", "device-2"))
