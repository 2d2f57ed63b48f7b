"""Finding the replica set from the seeds, and the thread that keeps its picture current.

# design:
# ``discover`` runs once at start-up: it asks every seed for its hello (legacy OP_QUERY
# isMaster, which every server version answers), checks that the seeds agree on the set
# name, and lists the members. ``DiscoveryThread`` then polls every member on a
# monitoring connection of its own every --discovery-interval (at once when woken after
# a server failure), hands each reply to the topology, and maintains the pools.
#
# Seeds whose hello says ``msg: "isdbgrid"`` are mongos routers (the routers mode): then
# every seed must be one (a router mixed with a replica-set member or a standalone is an
# error at start), and the routers are the seeds, a seed that did not answer at start
# included (it gets a listener and is checked like the others), plus the --member-map
# entries (as for a replica set). Routers name no members, so nothing is added or
# removed later (no reconcile), and no replSetGetStatus is run on them. A member of a
# routers topology that answers as something else than a router is shown down.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import wire
from dvara_lib.threads import start_thread_pool
from dvara_lib.errors import ConnectionFailure, DiscoveryError, ProtocolError
from dvara_lib.address import format_address, normalize
from dvara_lib.backend.connect import Backend, hello_request, run_hello
from dvara_lib.backend.topology import HOST_LIST_FIELDS, is_router

if TYPE_CHECKING:
    from dvara_lib.backend.topology import Member, Topology

log = logging.getLogger("dvara.discovery")

#: However often checks are asked for, a member is checked at most this often (seconds).
MIN_RECHECK = 0.25


@dataclass
class Discovered:
    """What the seeds said: the set name (None for a standalone or routers), the members
    (routers: the seeds), and whether they are mongos routers."""

    set_name: Optional[str]
    members: list[str]
    hellos: dict[str, dict[str, Any]] = field(default_factory=dict)
    routers: bool = False


def discover(backend: Backend, seeds: list[tuple[str, int]], timeout: float) -> Discovered:
    """Ask every seed for its hello; check they agree. Can raise DiscoveryError."""
    hellos = _ask_seeds(backend, seeds, timeout)
    if any(is_router(hello) for hello in hellos.values()):
        return _routers(seeds, hellos)
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


def _ask_seeds(backend: Backend, seeds: list[tuple[str, int]],
               timeout: float) -> dict[str, dict[str, Any]]:
    """Every seed's hello, by address. Can raise DiscoveryError (no seed answered)."""
    hellos: dict[str, dict[str, Any]] = {}
    failures = []
    for seed in seeds:
        name = format_address(*seed)
        try:
            hellos[name] = backend.probe(seed, timeout)
        except (ConnectionFailure, ProtocolError) as exc:
            failures.append(f"{name}: {exc}")
            log.warning("seed %s did not answer: %s", name, exc)
    if not hellos:
        raise DiscoveryError(f"no seed answered within {timeout:.0f}s ({'; '.join(failures)})")
    return hellos


def _routers(seeds: list[tuple[str, int]], hellos: dict[str, dict[str, Any]]) -> Discovered:
    """The seeds are mongos routers: every seed that answered must be one. Can raise
    DiscoveryError."""
    others = [f"{seed} is {_kind(hello)}" for seed, hello in hellos.items()
              if not is_router(hello)]
    if others:
        routers = ", ".join(seed for seed, hello in hellos.items() if is_router(hello))
        raise DiscoveryError(
            f"mixed seeds: {routers} answered as mongos router(s), but {'; '.join(others)}; "
            "give either mongos routers only, or the members of one replica set, "
            "or one standalone server")
    members: list[str] = []
    for seed in seeds:
        _add(members, format_address(*seed))
    return Discovered(None, members, {normalize(k): v for k, v in hellos.items()}, True)


def _kind(hello: dict[str, Any]) -> str:
    if hello.get("setName"):
        return f"a member of replica set {hello['setName']}"
    return "a standalone server"


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

    def __init__(self, member: "Member", timeout: float, backend: Backend) -> None:
        self.member = member
        self.timeout = timeout
        self.backend = backend
        self.failures = 0
        self._sock: Optional[socket.socket] = None

    def check(self) -> Check:
        started = time.monotonic()
        result = self._check()
        result.started = started
        return result

    def _check(self) -> Check:
        """The member's hello now (None if it cannot be reached), and, from a primary,
        the names its replSetGetStatus lists (hidden members show only there)."""
        try:
            hello = self._hello()
            primary = hello.get("isWritablePrimary") or hello.get("ismaster")
            names = self._status_names() if primary and not is_router(hello) else []
        except (ConnectionFailure, ProtocolError, OSError) as exc:
            self.failures += 1
            if self.failures & (self.failures - 1) == 0:   # 1st, 2nd, 4th, 8th... failure
                log.warning("member %s did not answer its hello (%d time(s)): %s",
                            self.member.real, self.failures, exc)
            self.close()
            return Check(self.member, None, [])
        if self.failures:
            log.info("member %s answers again after %d failed check(s)", self.member.real,
                     self.failures)
        self.failures = 0
        return Check(self.member, hello, names)

    def _hello(self) -> dict[str, Any]:
        if self._sock is None:
            self._sock, hello = self.backend.open_monitor(self.member, self.timeout)
            return hello
        return run_hello(self._sock, hello_request(self.member.max_wire_version, False))

    def _status_names(self) -> list[str]:
        """Member names from replSetGetStatus; [] if the server won't say."""
        doc = wire.round_trip(self._sock, wire.command({"replSetGetStatus": 1}, "admin",
                                                       self.member.max_wire_version))
        return [str(m["name"]) for m in doc.get("members") or [] if m.get("name")]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass
class Check:
    """One member check: its hello (None if unreachable) and the names its status lists."""

    member: "Member"
    hello: Optional[dict[str, Any]]
    status_names: list[str]
    started: float = 0.0


Reconcile = Callable[[dict[str, Optional[dict[str, Any]]], list[str]], None]


class DiscoveryThread(threading.Thread):
    """Checks every member every interval (at once when woken), each check on a small fixed
    pool of monitor threads so that a slow or dead member never delays the others.
    Results are applied in this thread only (the topology's single writer)."""

    def __init__(self, topology: "Topology", interval: float, timeout: float,
                 backend: Optional[Backend] = None, reconcile: Optional[Reconcile] = None,
                 monitor_threads: int = 4, seeds: tuple[tuple[str, int], ...] = ()) -> None:
        super().__init__(name="dvara-discovery", daemon=True)
        self.topology = topology
        self.interval = interval
        self.timeout = timeout
        self.backend = backend or Backend()
        self.reconcile = reconcile
        #: Called (in this thread) after each check is applied, with whether the member
        #: was up before it: the pools follow the member (dvara_lib.proxy.dataplane).
        self.on_checked: Callable[["Member", bool], None] = lambda member, was_up: None
        self._checks = start_thread_pool(monitor_threads, "dvara-monitor")
        self._monitors: dict[str, MemberMonitor] = {}
        self._inflight: dict[str, concurrent.futures.Future[Check]] = {}
        self._next_due: dict[str, float] = {}
        self._latest: dict[str, Optional[dict[str, Any]]] = {}
        self._status_names: list[str] = []
        self.seeds = seeds
        self._seed_probes: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        self._next_seed_probe = 0.0
        self._last_start: dict[str, float] = {}
        self._woken: set[str] = set()
        self._misfits: set[str] = set()     # routers mode: members that are no router
        self._wake_all = False
        self._wake = threading.Event()
        self._halt = threading.Event()

    def wake(self, member: Optional["Member"] = None) -> None:
        """Check member (every member if None) soon: a server connection failed or said
        the topology moved. However often this is called, a member is checked at most
        once per MIN_RECHECK seconds."""
        if member is None:
            self._wake_all = True
        else:
            self._woken.add(member.real)
        self._wake.set()

    def close(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self._wake.clear()
            try:
                self.tick(force=False)
            except Exception:
                log.exception("discovery failed; keeping the last known picture")
            self._wake.wait(0.05 if self._inflight else self._until_next_due())
        self._checks.shutdown(wait=False, cancel_futures=True)
        for monitor in self._monitors.values():
            monitor.close()

    def _until_next_due(self) -> float:
        due = list(self._next_due.values())
        due += [self._last_start.get(real, 0.0) + MIN_RECHECK for real in self._wanted()]
        if not due:
            return self.interval
        return max(0.0, min(due) - time.monotonic())

    def _wanted(self) -> set[str]:
        """Members someone asked to have checked (woken, or suspect) since their last check."""
        wanted = set(self._woken)
        for member in self.topology.members():
            if self._wake_all or member.suspect:
                wanted.add(member.real)
        return wanted

    def poll_once(self) -> None:
        """Check every member now and apply the results (start-up; tests)."""
        self.tick(force=True)
        for future in list(self._inflight.values()):
            try:
                future.result(self.timeout + 5)
            except concurrent.futures.TimeoutError:
                pass
        self.tick(force=False)

    def tick(self, force: bool) -> None:
        """Apply finished checks; start the checks that are due."""
        changed = self._apply_finished()
        now = time.monotonic()
        members = self.topology.members()
        wanted = self._wanted()
        self._woken, self._wake_all = set(), False
        for member in members:
            real = member.real
            if real in self._inflight:
                continue
            due = force or now >= self._next_due.get(real, 0.0) or (
                real in wanted and now - self._last_start.get(real, -MIN_RECHECK) >= MIN_RECHECK)
            if not due:
                if real in wanted:
                    self._woken.add(real)       # asked too soon after its last check
                continue
            self._next_due[real] = now + self.interval
            self._last_start[real] = now
            self._inflight[real] = self._checks.submit(self._monitor(member).check)
        known = {m.real for m in members}
        for real in list(self._next_due):
            if real not in known:
                self._forget(real)
        if members and not any(m.up for m in members):
            changed |= self._probe_seeds(now)
        if changed and self.reconcile is not None:
            self.reconcile(dict(self._latest), list(self._status_names))

    def _probe_seeds(self, now: float) -> bool:
        """No member answers: ask the seeds too (they may name members we do not know)."""
        found = False
        for name, future in list(self._seed_probes.items()):
            if future.done():
                del self._seed_probes[name]
                try:
                    hello = future.result()
                except Exception:
                    continue
                if hello.get("setName") == self.topology.set_name:
                    self._latest[normalize(name)] = hello
                    found = True
        if not self._seed_probes and now >= self._next_seed_probe:
            self._next_seed_probe = now + self.interval
            for seed in self.seeds:
                self._seed_probes[format_address(*seed)] = self._checks.submit(
                    self.backend.probe, seed, self.timeout)
        return found

    def _apply_finished(self) -> bool:
        applied = False
        for real, future in list(self._inflight.items()):
            if not future.done():
                continue
            del self._inflight[real]
            try:
                check = future.result()
            except Exception:
                log.exception("checking %s failed", real)
                continue
            self._apply(check)
            applied = True
        return applied

    def _apply(self, check: Check) -> None:
        member, hello = check.member, check.hello
        if self.topology.get(member.real) is not member:
            return
        if self.topology.routers and hello is not None and not is_router(hello):
            if member.real not in self._misfits:
                log.error("%s answers as %s, not as a mongos router: it stays down",
                          member.real, _kind(hello))
            self._misfits.add(member.real)
            hello = None
        else:
            self._misfits.discard(member.real)
        was_up = member.up
        self.topology.update(member, hello, checked_at=check.started)
        member.stats.gauge_set("member.up", 1 if hello is not None else 0)
        self._latest[member.real] = hello
        if check.status_names:
            self._status_names = check.status_names
        self.on_checked(member, was_up)

    def _monitor(self, member: "Member") -> MemberMonitor:
        monitor = self._monitors.get(member.real)
        if monitor is None or monitor.member is not member:
            monitor = self._monitors[member.real] = MemberMonitor(
                member, self.timeout, self.backend)
        return monitor

    def _forget(self, real: str) -> None:
        self._next_due.pop(real, None)
        self._last_start.pop(real, None)
        self._latest.pop(real, None)
        monitor = self._monitors.pop(real, None)
        if monitor is not None:
            monitor.close()
