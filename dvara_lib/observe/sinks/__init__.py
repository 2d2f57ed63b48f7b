"""The Sink protocol metrics are emitted through, and open_sinks() to build them by kind."""

from __future__ import annotations

import importlib
from typing import Mapping, Protocol, Sequence, runtime_checkable

from dvara_lib.errors import ConfigError
from dvara_lib.observe.metrics import Sample

# Each kind is a module dvara_lib.observe.sinks.<kind> with
#     open_sink(targets: list[tuple[str, int]], interval: float) -> Sink
# A statsd sink is one new module (sinks/statsd.py) plus one option that puts
# "statsd": [...] into the mapping given to open_sinks().
KINDS = ("ganglia",)


@runtime_checkable
class Sink(Protocol):
    """Where emitted samples go.  emit() must not raise and must not block for long."""

    def emit(self, samples: Sequence[Sample]) -> None:
        """Send one interval's samples."""

    def close(self) -> None:
        """Release sockets; emit() is not called again."""


def open_sinks(targets_by_kind: Mapping[str, Sequence[tuple[str, int]]], interval: float
               ) -> list[Sink]:
    """Return one sink per kind that has targets (addresses the configuration parsed),
    e.g. {"ganglia": [("gmond.example", 8649)]}.

    Can raise ConfigError for an unknown kind.
    """
    sinks: list[Sink] = []
    for kind, targets in targets_by_kind.items():
        if not targets:
            continue
        if kind not in KINDS:
            raise ConfigError(f"unknown metrics sink {kind!r}; expected one of {', '.join(KINDS)}")
        module = importlib.import_module(f"{__name__}.{kind}")
        sinks.append(module.open_sink(list(targets), interval))
    return sinks
