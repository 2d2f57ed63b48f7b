"""Markers by folder, and fixtures: real backends (SecantusDB) and dvara, each a subprocess
on free loopback ports."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers import Dvara, RawClient, Secantus

_KINDS = ("unit", "integration")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/unit, tests/integration), before -m selects."""
    for item in items:
        kind = next((k for k in _KINDS if k in item.path.parts), None)
        if kind is None:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit or "
                                    "tests/integration")
        item.add_marker(kind)


@pytest.fixture(scope="module")
def secantus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    """One SecantusDB server shared by a test module (tests that harm it use their own)."""
    server = Secantus(tmp_path_factory.mktemp("secantus"))
    yield server
    server.stop()


@pytest.fixture()
def fresh_secantus(tmp_path: Path) -> Iterator[Secantus]:
    """A SecantusDB server of this test's own, for tests that stop or kill it."""
    server = Secantus(tmp_path)
    yield server
    server.stop()


@pytest.fixture()
def start_dvara(tmp_path: Path) -> Iterator[Callable[..., Dvara]]:
    """Start dvara (python dvara.py ...) in front of addrs; stopped at teardown."""
    started: list[Dvara] = []

    def start(addrs: str, *args: str, **kwargs) -> Dvara:
        proxy = Dvara(tmp_path, addrs, *args, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture()
def raw_client() -> Iterator[Callable[..., RawClient]]:
    """Open a RawClient(port, timeout=...); every client opened is closed at teardown,
    whether the test passed or not."""
    opened: list[RawClient] = []

    def open_client(port: int, timeout: float = 10.0) -> RawClient:
        client = RawClient(port, timeout)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()
