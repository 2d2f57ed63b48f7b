"""hello and legacy isMaster, answered by the proxy from the member's latest real hello.

Drivers hold an awaitable hello per member on a monitoring connection; relaying those
would pin one server connection per client per member. The proxy answers them itself,
with every host field naming proxy addresses, and parks awaitable ones (see acceptor).

# design:
# A mongos router's answer is its own hello (``msg: "isdbgrid"``, no hosts, set name or
# primary) with the proxy's connectionId and topologyVersion: drivers see a Mongos per
# router port and a Sharded topology. A router that is down gets no answer: a mongos
# that is down does not answer, and a driver that cannot run its hello marks the server
# Unknown and clears its pool (the SDAM spec), so the hello's connection is closed. A
# down replica-set member is shown as neither primary nor secondary instead. A hello
# with ``loadBalanced: true`` (a driver in load-balanced mode, --load-balanced) gets the
# router's ``serviceId`` too.
"""

from __future__ import annotations

import datetime
import math
from typing import TYPE_CHECKING, Any, Optional

from dvara_lib import wire

from dvara_lib.backend.topology import is_router

if TYPE_CHECKING:
    from dvara_lib.backend.topology import Member, Topology

HELLO_NAMES = frozenset({"hello", "isMaster", "ismaster"})
#: The longest an awaitable hello is held (drivers ask for 10 s; a client asking for more
#: is answered after this and simply asks again).
MAX_AWAIT_SECONDS = 60.0
_ROLE_FIELDS = ("isWritablePrimary", "ismaster", "secondary", "primary", "arbiterOnly")


def is_hello(name: Optional[str]) -> bool:
    return name in HELLO_NAMES


def negotiate_compression(request: dict[str, Any]) -> list[str]:
    """The client's compressors that the proxy can decode, in the client's order."""
    offered = request.get("compression")
    if not isinstance(offered, list):
        return []
    return [c for c in offered if c in wire.SUPPORTED_COMPRESSORS]


def max_await_seconds(request: dict[str, Any]) -> Optional[float]:
    """maxAwaitTimeMS in seconds (at most MAX_AWAIT_SECONDS), or None unless it is a
    finite number >= 0.

    (A NaN deadline would never come due and would stall every parked hello behind it.)
    """
    max_await = request.get("maxAwaitTimeMS")
    if not isinstance(max_await, (int, float)) or not math.isfinite(max_await) \
            or max_await < 0:
        return None
    return min(float(max_await) / 1000.0, MAX_AWAIT_SECONDS)


def wait_seconds(request: dict[str, Any], topology: "Topology", member: "Member") -> float:
    """How long an awaitable hello may be parked: 0 if it must be answered now."""
    tv = request.get("topologyVersion")
    max_await = max_await_seconds(request)
    if not isinstance(tv, dict) or max_await is None:
        return 0.0
    if tv.get("processId") != topology.process_id or tv.get("counter") != member.counter:
        return 0.0
    return max_await


def build_answer(topology: "Topology", member: "Member", command: str,
                 request: dict[str, Any], connection_id: int,
                 compressors: list[str]) -> Optional[dict[str, Any]]:
    """The proxy's reply to one hello/isMaster, or None if the member was never reachable
    or is a router that is down (the client's connection is then closed)."""
    base = member.answer
    if base is None or (not member.up and is_router(base)):
        return None
    doc = dict(base)
    if not member.up:
        _as_unreachable(doc)
    _set_role_names(doc, command)
    doc["topologyVersion"] = {"processId": topology.process_id, "counter": member.counter}
    doc["connectionId"] = connection_id
    doc["localTime"] = datetime.datetime.now(datetime.timezone.utc)
    if request.get("helloOk"):
        doc["helloOk"] = True
    if "compression" in request:
        doc["compression"] = compressors
    if request.get("loadBalanced") and is_router(base):
        doc["serviceId"] = member.service_id    # a driver with loadBalanced=true needs it
    doc.pop("ok", None)
    doc["ok"] = 1.0
    return doc


def _as_unreachable(doc: dict[str, Any]) -> None:
    """A member the proxy cannot reach is shown as neither primary nor secondary."""
    for field in _ROLE_FIELDS:
        doc.pop(field, None)
    doc["isWritablePrimary"] = False
    doc["secondary"] = False


def _set_role_names(doc: dict[str, Any], command: str) -> None:
    """hello says isWritablePrimary; legacy isMaster says ismaster."""
    writable = bool(doc.pop("isWritablePrimary", False)) | bool(doc.pop("ismaster", False))
    key = "isWritablePrimary" if command == "hello" else "ismaster"
    doc[key] = writable
