"""Which members the proxy stands in for, and which port each one has, stably.

Ports come from, in order: --member-map (by hand), the --state-file (the port a member
had before, in this process or an earlier one), then the first free port of the range.
A member that leaves keeps its port reserved for the life of the process, so it gets it
back when it returns. The state file is written atomically (write, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Iterable, Optional

from dvara_lib.address import format_address, normalize
from dvara_lib.backend.topology import HOST_LIST_FIELDS

log = logging.getLogger("dvara.membership")


def wanted_members(hellos: dict[str, Optional[dict[str, Any]]], current: Iterable[str],
                   extra: Iterable[str] = ()) -> list[str]:
    """The members to proxy, given each known member's latest hello (None: unreachable).

    The primary's view decides (SDAM); without a primary members are only ever added.
    """
    current = list(current)
    primaries = [h for h in hellos.values() if h and _is_primary(h)]
    if primaries:
        names = _named(primaries[0])
    else:
        names = list(current)
        for hello in hellos.values():
            if hello:
                names.extend(_named(hello))
    for name in extra:
        names.append(name)
    out: list[str] = []
    for name in names:
        name = normalize(name)
        if name not in out:
            out.append(name)
    return out


def _is_primary(hello: dict[str, Any]) -> bool:
    return bool(hello.get("isWritablePrimary") or hello.get("ismaster")) and "setName" in hello


def _named(hello: dict[str, Any]) -> list[str]:
    names = [str(h) for field in HOST_LIST_FIELDS for h in hello.get(field) or []]
    if hello.get("me"):
        names.append(str(hello["me"]))
    return names


class PortBook:
    """Stable member → port assignments within a range, with manual pins and a state file."""

    def __init__(self, port_start: int, port_end: int,
                 member_map: Iterable[tuple[tuple[str, int], int]] = (),
                 state_file: Optional[str] = None) -> None:
        self.ports = range(port_start, port_end + 1)
        self.pinned = {format_address(*addr): port for addr, port in member_map}
        self.state_file = state_file
        self.assigned: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        if not self.state_file or not os.path.exists(self.state_file):
            return
        try:
            with open(self.state_file, encoding="utf-8") as fh:
                ports = json.load(fh).get("ports", {})
            self.assigned = {normalize(k): int(v) for k, v in ports.items()}
            log.info("loaded %d port assignment(s) from %s", len(self.assigned), self.state_file)
        except (OSError, ValueError, AttributeError) as exc:
            log.error("ignoring unreadable state file %s: %s", self.state_file, exc)

    def port_for(self, member: str, in_use: Iterable[int]) -> Optional[int]:
        """The port member gets (stable), or None when the range has none left."""
        busy = set(in_use)
        if member in self.pinned:
            return self.pinned[member]
        port = self.assigned.get(member)
        if port is not None and port not in busy and port not in self._pinned_ports():
            return port
        reserved = set(self.assigned.values()) | self._pinned_ports() | busy
        for port in self.ports:
            if port not in reserved:
                self.assigned[member] = port
                self.save()
                return port
        return self._reuse_reservation(member, busy)

    def _reuse_reservation(self, member: str, busy: set[int]) -> Optional[int]:
        """No unreserved port: take the port of a member that is gone."""
        for other, port in list(self.assigned.items()):
            if port not in busy and port not in self._pinned_ports() and port in self.ports:
                del self.assigned[other]
                self.assigned[member] = port
                self.save()
                return port
        return None

    def _pinned_ports(self) -> set[int]:
        return set(self.pinned.values())

    def save(self) -> None:
        """Write the assignments to the state file atomically (if there is one)."""
        if not self.state_file:
            return
        folder = os.path.dirname(os.path.abspath(self.state_file))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".dvara-state-", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"ports": self.assigned}, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.error("could not write the state file %s: %s", self.state_file, exc)
