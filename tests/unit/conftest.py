"""Fixtures of the in-process tests."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from tests.relay_rig import Answer, Rig, ok


@pytest.fixture()
def rig() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(answer: Answer = ok, *flags: str, wire_version: int = 17) -> Rig:
        made.append(Rig(answer, *flags, wire_version=wire_version))
        return made[-1]

    yield make
    for r in made:
        r.close()


