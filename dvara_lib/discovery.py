"""Finding the replica set from the seeds, and the thread that keeps its picture current.

# design:
# ``discover`` runs once at start-up: it asks every seed for its hello (legacy OP_QUERY
# isMaster, which every server version answers), checks that the seeds agree on the set
# name, and lists the members. ``DiscoveryThread`` then polls every member on a
# monitoring connection of its own every --discovery-interval (at once when woken after
# a server failure), hands each reply to the topology, and maintains the pools.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import wire
from dvara_lib.errors import ConnectionFailure, DiscoveryError, ProtocolError
from dvara_lib.topology import HOST_LIST_FIELDS, format_address, normalize

if TYPE_CHECKING:
    from dvara_lib.topology import Member, Topology

log = logging.getLogger("dvara.discovery")

#: Wire version from which a server speaks OP_MSG (MongoDB 3.6).
OP_MSG_WIRE_VERSION = 6
CLIENT_METADATA = {"driver": {"name": "dvara", "version": ""}, "os": {"type": "Linux"}}


def handshake_doc(app_version: str) -> dict[str, Any]:
    meta = {**CLIENT_METADATA, "driver": {"name": "dvara", "version": app_version}}
    return {"isMaster": 1, "helloOk": True, "client": meta}


def hello_request(max_wire_version: int, first: bool, app_version: str = "") -> bytes:
    """The proxy's own hello: OP_MSG for 3.6+, legacy OP_QUERY isMaster otherwise."""
    if first or max_wire_version < OP_MSG_WIRE_VERSION:
        doc = handshake_doc(app_version) if first else {"isMaster": 1}
        return wire.op_query("admin.$cmd", doc)
    return wire.op_msg({"hello": 1, "$db": "admin"})


def run_hello(sock: socket.socket, request: bytes) -> dict[str, Any]:
    """Send a hello on sock and return the reply document. Can raise ConnectionFailure."""
    wire.send_all(sock, request)
    reply = wire.read_frame(sock)
    if wire.response_to(reply) != wire.request_id(request):
        raise ProtocolError("hello reply answers another request")
    doc = wire.reply_document(reply)
    if not doc.get("ok"):
        raise ConnectionFailure(f"hello failed: {doc.get('errmsg', doc)}")
    return doc


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to a server. Can raise ConnectionFailure."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise ConnectionFailure(f"cannot connect to {format_address(*address)}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def probe(address: tuple[str, int], timeout: float) -> dict[str, Any]:
    """One hello from a server on a short-lived connection. Can raise ConnectionFailure."""
    sock = connect(address, timeout)
    try:
        return run_hello(sock, hello_request(0, first=True))
    finally:
        sock.close()


@dataclass
class Discovered:
    """What the seeds said: the set name (None for a standalone) and the members."""

    set_name: Optional[str]
    members: list[str]
    hellos: dict[str, dict[str, Any]] = field(default_factory=dict)


def discover(seeds: list[tuple[str, int]], timeout: float) -> Discovered:
    """Ask every seed for its hello; check they agree. Can raise DiscoveryError."""
    hellos: dict[str, dict[str, Any]] = {}
    failures = []
    for seed in seeds:
        name = format_address(*seed)
        try:
            hellos[name] = probe(seed, timeout)
        except (ConnectionFailure, ProtocolError) as exc:
            failures.append(f"{name}: {exc}")
            log.warning("seed %s did not answer: %s", name, exc)
    if not hellos:
        raise DiscoveryError(f"no seed answered within {timeout:.0f}s ({'; '.join(failures)})")
    names = {seed: hello.get("setName") for seed, hello in hellos.items()}
    if len(set(names.values())) > 1:
        said = ", ".join(f"{seed} says {name or 'standalone'}" for seed, name in names.items())
        raise DiscoveryError(f"the seeds disagree on the replica set name: {said}")
    set_name = next(iter(names.values()))
    if set_name is None:
        if len(hellos) > 1:
            raise DiscoveryError("several seeds answered as standalone servers; "
                                 "give one standalone or the members of one replica set")
        return Discovered(None, list(hellos), hellos)
    return Discovered(set_name, member_list(hellos.values()), hellos)


def member_list(hellos: Any) -> list[str]:
    """Every member the hellos name (hosts, passives, arbiters, me), primary's view first."""
    ordered = sorted(hellos, key=lambda h: not (h.get("isWritablePrimary") or h.get("ismaster")))
    members: list[str] = []
    for hello in ordered:
        for field_name in HOST_LIST_FIELDS:
            for host in hello.get(field_name) or []:
                _add(members, str(host))
        if hello.get("me"):
            _add(members, str(hello["me"]))
    return members


def _add(members: list[str], host: str) -> None:
    host = normalize(host)
    if host not in members:
        members.append(host)


class MemberMonitor:
    """The proxy's own monitoring connection to one member."""

    def __init__(self, member: "Member", timeout: float, app_version: str) -> None:
        self.member = member
        self.timeout = timeout
        self.app_version = app_version
        self._sock: Optional[socket.socket] = None

    def check(self) -> Optional[dict[str, Any]]:
        """The member's hello now, or None if it cannot be reached."""
        try:
            if self._sock is None:
                self._sock = connect(self.member.address, self.timeout)
                return run_hello(self._sock, hello_request(0, True, self.app_version))
            return run_hello(self._sock, hello_request(self.member.max_wire_version, False))
        except (ConnectionFailure, ProtocolError, OSError) as exc:
            log.warning("member %s did not answer its hello: %s", self.member.real, exc)
            self.close()
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class DiscoveryThread(threading.Thread):
    """Polls every member every interval (or at once when woken) and keeps pools healthy."""

    def __init__(self, topology: "Topology", interval: float, timeout: float,
                 app_version: str = "") -> None:
        super().__init__(name="dvara-discovery", daemon=True)
        self.topology = topology
        self.interval = interval
        self.timeout = timeout
        self.app_version = app_version
        self._monitors: dict[str, MemberMonitor] = {}
        self._wake = threading.Event()
        self._halt = threading.Event()
        self.polls = 0

    def wake(self) -> None:
        """Check every member now (a server connection failed or said the topology moved)."""
        self._wake.set()

    def close(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self._wake.clear()
            try:
                self.poll_once()
            except Exception:
                log.exception("discovery poll failed; keeping the last known picture")
            self._wake.wait(self.interval)
        for monitor in self._monitors.values():
            monitor.close()

    def poll_once(self) -> None:
        for member in self.topology.members():
            monitor = self._monitors.get(member.real)
            if monitor is None:
                monitor = self._monitors[member.real] = MemberMonitor(
                    member, self.timeout, self.app_version)
            hello = monitor.check()
            if hello is None and member.up:
                member.pool.clear()
            self.topology.update(member, hello)
            member.stats.gauge_set("member.up", 1 if hello is not None else 0)
            if hello is not None:
                member.pool.maintain()
        self.polls += 1


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll predicate until it holds or timeout passes (start-up helper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
