"""The proxy's picture of the replica set: members, their proxy addresses, their hellos.

A ``Member`` is one real mongod and the listener that stands in for it. The discovery
thread is the only writer of a member's hello; workers read ``member.answer`` (a dict
that is replaced, never mutated) without a lock.

# design:
# In the routers mode (the seeds are mongos routers of a sharded cluster, their hellos
# say ``msg: "isdbgrid"``) every router is a Member as well: its own listener, pool and
# checks. A router's hello names no hosts, so ``rewrite_hello`` leaves it as it is
# (per-connection fields dropped); ``Topology.routers`` says which mode this is.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import bson

from dvara_lib.address import parse_address
from dvara_lib.backend.pool import Pool

if TYPE_CHECKING:
    from dvara_lib.observe.metrics import MemberMetrics

log = logging.getLogger("dvara.topology")

#: hello fields that name hosts, and so must show proxy addresses.
HOST_LIST_FIELDS = ("hosts", "passives", "arbiters")
HOST_FIELDS = ("primary", "me")
#: hello fields that change on every call, or that belong to one connection.
VOLATILE_FIELDS = frozenset({
    "localTime", "connectionId", "topologyVersion", "lastWrite", "$clusterTime",
    "operationTime", "compression", "helloOk", "saslSupportedMechs",
    "speculativeAuthenticate", "ok"})
#: Fields the proxy never passes on from a server's hello.
DROPPED_FIELDS = frozenset({
    "connectionId", "topologyVersion", "compression", "helloOk", "saslSupportedMechs",
    "speculativeAuthenticate", "localTime"})
#: What a mongos router says in its hello's ``msg`` field (drivers see a Mongos).
ROUTER_MSG = "isdbgrid"


def is_router(hello: Optional[dict[str, Any]]) -> bool:
    """Whether hello is a mongos router's."""
    return hello is not None and hello.get("msg") == ROUTER_MSG


class Member:
    """One replica-set member and the proxy listener that stands in for it."""

    def __init__(self, real: str, proxy: str, proxy_port: int, pool: Optional[Pool],
                 stats: "MemberMetrics") -> None:
        self.real = real
        self.stats = stats
        self.address = parse_address(real)
        self.proxy = proxy
        self.proxy_port = proxy_port
        self.pool = pool
        self.hello: Optional[dict[str, Any]] = None   # latest real reply
        self.answer: Optional[dict[str, Any]] = None  # rewritten, volatile fields dropped
        self.up = False
        self.counter = 0                               # proxy topologyVersion counter
        self.max_wire_version = 0
        self.suspect_since = 0.0    # when a reply last said this member changed (monotonic)
        self.checked_at = 0.0       # when the latest applied check started (monotonic)
        #: --load-balanced: the serviceId drivers see for this router (the LB spec)
        self.service_id = bson.ObjectId()

    @property
    def suspect(self) -> bool:
        """A relayed reply said this member changed and no check has confirmed it since."""
        return self.suspect_since > self.checked_at

    def shared_state(self) -> dict[str, Any]:
        """What another process needs to answer hellos as this one (Topology.apply_state)."""
        return {"answer": self.answer, "up": self.up, "counter": self.counter,
                "max_wire_version": self.max_wire_version, "checked_at": self.checked_at}

    @property
    def state(self) -> str:
        hello = self.answer
        if not self.up or hello is None:
            return "DOWN"
        if is_router(hello):
            return "ROUTER"
        if hello.get("isWritablePrimary") or hello.get("ismaster"):
            return "PRIMARY"
        if hello.get("secondary"):
            return "SECONDARY"
        if hello.get("arbiterOnly"):
            return "ARBITER"
        return "OTHER"

    def __repr__(self) -> str:
        return f"<Member {self.real} as {self.proxy}>"


class Topology:
    """Members by real address, the real→proxy address map, and change notification.

    routers: the members are mongos routers (no set name, no membership from hellos)."""

    def __init__(self, set_name: Optional[str],
                 process_id: Optional[bson.ObjectId] = None, routers: bool = False) -> None:
        self.set_name = set_name
        self.routers = routers
        self.process_id = process_id or bson.ObjectId()
        self._members: dict[str, Member] = {}
        self._proxy_of: dict[str, str] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Member], None]] = []

    # -- membership ---------------------------------------------------------------------
    def add(self, member: Member) -> None:
        with self._lock:
            self._members[member.real] = member
            self._proxy_of = {**self._proxy_of, member.real: member.proxy}

    def remove(self, member: Member) -> None:
        with self._lock:
            self._members.pop(member.real, None)
            self._proxy_of = {k: v for k, v in self._proxy_of.items() if k != member.real}

    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members.values())

    def get(self, real: str) -> Optional[Member]:
        return self._members.get(real)

    def proxy_of(self, real: str) -> Optional[str]:
        """The proxy address standing in for a real member address, or None."""
        return self._proxy_of.get(real.lower())

    def on_change(self, callback: Callable[[Member], None]) -> None:
        """Call callback(member) whenever a member's rewritten hello changes."""
        self._listeners.append(callback)

    # -- hello ----------------------------------------------------------------------------
    def suspect(self, member: Member) -> None:
        """A relayed reply says member changed: hellos for it wait for a fresh check."""
        member.suspect_since = time.monotonic()

    def update(self, member: Member, hello: Optional[dict[str, Any]],
               checked_at: Optional[float] = None) -> bool:
        """Record a member's latest hello (None: unreachable). True if clients must learn it."""
        was_suspect = member.suspect
        if checked_at is not None:
            member.checked_at = max(member.checked_at, checked_at)
        up = hello is not None
        answer = self.rewrite_hello(hello) if hello is not None else member.answer
        changed = up != member.up or _stable(answer) != _stable(member.answer)
        before = member.state
        if hello is not None:
            member.hello = hello
            member.max_wire_version = int(hello.get("maxWireVersion", 0))
        member.answer = answer
        member.up = up
        if changed:
            member.counter += 1
            level = logging.INFO if member.state != before else logging.DEBUG
            log.log(level, "member %s is now %s", member.real, member.state)
        if changed or (was_suspect and not member.suspect):
            for callback in self._listeners:
                callback(member)
        return changed

    def apply_state(self, member: Member, state: dict[str, Any]) -> None:
        """Take a member's state as another process's discovery found it (its ``state()``),
        so that every process gives clients the same answer and topologyVersion."""
        was_suspect = member.suspect
        changed = state["counter"] != member.counter
        member.answer, member.up = state["answer"], state["up"]
        member.counter, member.max_wire_version = state["counter"], state["max_wire_version"]
        member.checked_at = max(member.checked_at, state["checked_at"])
        if changed or (was_suspect and not member.suspect):
            for callback in self._listeners:
                callback(member)

    def refresh(self) -> None:
        """Rewrite every member's answer again (after the address map changed)."""
        for member in self.members():
            if member.hello is not None:
                self.update(member, member.hello if member.up else None)

    def rewrite_hello(self, hello: dict[str, Any]) -> dict[str, Any]:
        """A copy of a server's hello naming proxy addresses only, per-connection fields dropped."""
        out = {k: v for k, v in hello.items() if k not in DROPPED_FIELDS}
        for field in HOST_LIST_FIELDS:
            if field in out:
                out[field] = self._map_list(out[field])
        for field in HOST_FIELDS:
            if field in out:
                mapped = self.proxy_of(str(out[field]))
                if mapped is None:
                    del out[field]
                else:
                    out[field] = mapped
        return out

    def _map_list(self, hosts: Iterable[Any]) -> list[str]:
        mapped = []
        for host in hosts:
            proxy = self.proxy_of(str(host))
            if proxy is not None:
                mapped.append(proxy)
        return mapped

    def rewrite_addresses(self, value: Any) -> Any:
        """value with every string naming a real member replaced by its proxy address."""
        if isinstance(value, str):
            return self._proxy_of.get(value.lower(), value)
        if isinstance(value, dict):
            return {k: self.rewrite_addresses(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rewrite_addresses(v) for v in value]
        return value


def _stable(answer: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if answer is None:
        return None
    return {k: v for k, v in answer.items() if k not in VOLATILE_FIELDS}
