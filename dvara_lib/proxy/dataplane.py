"""The relay of one process: its members' pools and listeners, its workers and acceptor.

# design:
# A DataPlane is what a dvara process needs to serve clients: for each member a bounded
# pool and the member's listener (handed in by the control plane, which opens it), the
# relay, the fixed worker pool (Dispatcher) and the acceptor. With --processes 1 the
# Server runs one DataPlane beside discovery and they share the Member objects; with
# --processes N each worker process runs one, fed with members and their states by the
# parent (dvara_lib.process.worker). A process's part of every limit (server connections per
# member, clients in all, clients per IP) and of the connection-id space comes from its
# ``Share``, so the processes together never exceed the configured limits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib.proxy.acceptor import Acceptor
from dvara_lib.proxy.client import Budget, ClientIO, Tee
from dvara_lib.backend.connect import Backend
from dvara_lib.proxy.dispatch import Dispatcher
from dvara_lib.observe.metrics import MemberMetrics, Metrics
from dvara_lib.backend.pool import Pool, PoolStats
from dvara_lib.backend.userpool import UserPool
from dvara_lib.proxy.relay import Relay
from dvara_lib.backend.topology import Member, Topology

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.proxy.handover import ClientSink

log = logging.getLogger("dvara.dataplane")

#: How long stopping waits for the workers once their clients and connections are cut.
_WORKER_STOP_WAIT = 5.0


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's part of the whole: process ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def part(self, total: int) -> int:
        """This process's part of total, the parts summing to total."""
        return total // self.count + (1 if self.index < total % self.count else 0)

    def limits(self, settings: "Settings") -> "Settings":
        """settings with every limit that the processes share cut to this one's part."""
        if self.count == 1:
            return settings
        return dataclasses.replace(
            settings, max_connections=self.part(settings.max_connections),
            min_idle_connections=self.part(settings.min_idle_connections),
            max_client_connections=self.part(settings.max_client_connections),
            max_per_client_connections=max(1, self.part(settings.max_per_client_connections)),
            max_user_connections=settings.max_user_connections and max(
                1, self.part(settings.max_user_connections)))


def pin_to_cpu(setting: "str | tuple[int, ...]", index: int) -> Optional[int]:
    """Keep this process (the calling thread and the threads it starts from now on) on one
    CPU, per --cpu-affinity; the CPU, or None if left to the kernel.

    A CPython process runs its Python code on one CPU at a time, and its threads pass
    the GIL among them at every blocking call; on one CPU that is a plain switch, across
    two it wakes the other CPU each time, which costs more than the relaying itself.
    """
    if setting == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cpus = allowed if setting == "auto" else list(setting)
    cpu = cpus[index % len(cpus)]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.warning("cannot keep this process on CPU %d (%s); the kernel places it", cpu, exc)
        return None
    return cpu


class _PoolMetrics(PoolStats):
    """Pool events as member measures (its open and in-use counts are read live)."""

    def __init__(self, stats: MemberMetrics) -> None:
        self.created = functools.partial(stats.incr, "server.created")
        self.closed = functools.partial(stats.incr, "server.closed")
        self.checkout_wait = functools.partial(stats.observe, "server.checkout_wait")
        self.checkout_timeout = functools.partial(stats.incr, "server.checkout_timeouts")
        self.held = functools.partial(stats.observe, "server.held")


class DataPlane:
    """Methods for the control plane: start, add_member, remove_member, checked,
    apply_settings, adopt, stop, status, dead_thread.

    ``wake(member)`` asks discovery to check a member soon (a server connection failed,
    or a reply said the member changed).
    """

    def __init__(self, settings: "Settings", topology: Topology, metrics: Metrics,
                 wake: Callable[[Member], None], backend: Backend,
                 share: Share = Share()) -> None:
        self.share = share
        self.backend = backend
        self.settings = share.limits(settings)
        self.topology = topology
        self.metrics = metrics
        self.wake = wake
        s = self.settings
        tee = Tee(s.tee_file) if s.tee_file else None
        self.io = ClientIO(Budget(share.part(s.max_buffered_bytes)), s.message_timeout,
                           s.worker_linger, tee, first_id=share.index + 1, id_step=share.count)
        self.relay = Relay(s, topology, self._handback, on_server_failure=self._server_failed,
                           on_state_change=self._state_changed, run_command=self._run_command)
        # As many pinned workers as one member's pins can need (each holds a connection).
        self.dispatcher = Dispatcher(s.workers, max(2, min(s.workers, s.max_connections)),
                                     self.relay.serve, self.relay.serve_parked)
        self.acceptor = Acceptor(s, self.dispatcher, self.relay, self.io)
        self.relay.backlog = self.dispatcher
        self.relay.requeue = self.dispatcher.submit
        self.relay.acceptor = self.acceptor
        topology.on_change(self.acceptor.topology_changed)

    def start(self) -> None:
        self.acceptor.start()

    def _handback(self, client: Any, verdict: Any, parked: Any) -> None:
        self.acceptor.handback(client, verdict, parked)

    def _run_command(self, member: Member, doc: dict[str, Any], db: str) -> dict[str, Any]:
        """A command as the proxy's account (--auth-query's user lookups)."""
        return self.backend.command_as_proxy(member, doc, db, self.settings.message_timeout)

    def _server_failed(self, member: Member) -> None:
        """A server connection to member failed: discovery looks at it now; with
        --load-balanced, new clients go to other routers until a check says it is up."""
        if self.settings.load_balanced:
            self.topology.suspect(member)
        self.wake(member)

    def _state_changed(self, member: Member, shutting_down: bool) -> None:
        """A relayed reply said member is no longer what clients think (SDAM error)."""
        self.topology.suspect(member)
        if shutting_down:
            member.pool.clear()
        self.wake(member)

    # -- members --------------------------------------------------------------------------
    def add_member(self, real: str, proxy: str, port: int, listeners: list[socket.socket],
                   max_wire_version: int = 0) -> Member:
        """Serve member real on its listener (the control plane opened it)."""
        [listener] = listeners
        s = self.settings
        stats = self.metrics.member(real)
        if s.auth_passthrough:                  # connections logged in per user
            pool: Pool = UserPool(real, lambda login: self.backend.open_pooled_as(
                member, self.settings.message_timeout, login), s.max_connections,
                s.max_user_connections, s.server_idle_timeout, _PoolMetrics(stats))
        else:
            pool = Pool(real, lambda: self.backend.open_pooled(member, self.settings.message_timeout), s.max_connections,
                        s.min_idle_connections, s.server_idle_timeout, _PoolMetrics(stats))
        stats.live_gauge("server.open", lambda: pool.open_count)
        stats.live_gauge("server.in_use", lambda: pool.in_use)
        member = Member(real, proxy, port, pool, stats)
        member.max_wire_version = max_wire_version
        self.topology.add(member)
        self.acceptor.add_listener(listener, member)
        return member

    def add_balanced_listener(self, listener: socket.socket, name: str) -> None:
        """One listener for every router (--load-balanced): a new client is bound to the
        routable router with the fewest clients."""
        self.acceptor.add_balanced_listener(listener, name, self._routable)

    def _routable(self) -> list[Member]:
        """The routers a new load-balanced client may be bound to: those up, and not
        suspect (a connection to it just failed) unless every one is."""
        up = [m for m in self.topology.members() if m.up]
        return [m for m in up if not m.suspect] or up

    def close_clients(self, member: Member) -> None:
        """--load-balanced: a router went down; its clients' connections are closed (after
        their message in flight) so that drivers open new ones, bound to other routers."""
        self.acceptor.close_clients(member, "its router is down")

    def remove_member(self, member: Member) -> None:
        """Stop accepting for member; its clients finish what is in flight and are closed."""
        self.topology.remove(member)
        self.acceptor.retire(member)
        member.pool.close()
        self.metrics.forget(member.real)

    @staticmethod
    def checked(member: Member, was_up: bool) -> None:
        """A check of member was applied: retire its pool if it went down, else keep the
        pool's idle connections fresh (runs in the thread that applies checks)."""
        if was_up and not member.up:
            member.pool.clear()
        elif member.up:
            member.pool.maintain()

    # -- settings, status -------------------------------------------------------------------
    def apply_settings(self, settings: "Settings") -> None:
        """Use new settings for everything that can change while running (SIGHUP)."""
        old, new = self.settings, self.share.limits(settings)
        self.settings = new
        self.relay.apply_settings(new)
        self.acceptor.settings = new
        self.io.write_timeout = new.message_timeout
        self.io.linger = new.worker_linger
        self.io.budget.limit = self.share.part(new.max_buffered_bytes)
        for member in self.topology.members():
            member.pool.resize(new.max_connections, new.min_idle_connections,
                               new.server_idle_timeout)
            if new.message_timeout != old.message_timeout:
                member.pool.clear()     # new connections take the new time-out

    def status(self) -> dict[str, Any]:
        """What this process serves: clients, and per member its pool and clients."""
        per_member = self.acceptor.clients_per_member()
        members = {m.real: {"open": m.pool.open_count, "in_use": m.pool.in_use,
                            "waiting": m.pool.waiting, "max": m.pool.max_size,
                            "clients": per_member.get(m.real, 0)}
                   for m in self.topology.members()}
        for m in self.topology.members():
            if isinstance(m.pool, UserPool):    # --auth-passthrough: per user too
                members[m.real]["users"] = m.pool.users()
        return {"clients": self.acceptor.counts(), "members": members}

    def dead_thread(self) -> Optional[str]:
        """The name of this plane's thread that died, if one did."""
        return None if self.acceptor.is_alive() else self.acceptor.name

    # -- hand-over and stop -----------------------------------------------------------------
    def adopt(self, sock: socket.socket, meta: dict[str, Any]) -> bool:
        """Take over a client handed over by the process this one replaces."""
        member = self.topology.get(meta["member"])
        if member is None:
            sock.close()
            return False
        self.acceptor.adopt(sock, meta, member)
        return True

    def stop(self, timeout: float, sender: Optional["ClientSink"] = None) -> None:
        """Stop accepting; between two messages close every client (or hand it to the new
        process); wait up to timeout for messages in flight, then cut what is left. The
        workers are stopped before the acceptor closes its descriptors."""
        acceptor = self.acceptor
        if acceptor.is_alive():
            acceptor.drain(sender)
            if not acceptor.drained.wait(timeout):
                log.warning("%d client(s) still busy or pinned after %.1fs; closing them",
                            acceptor.counts()["clients"], timeout)
        acceptor.abort_busy()
        for member in self.topology.members():
            member.pool.abort()
        self.dispatcher.shutdown(wait_seconds=_WORKER_STOP_WAIT)
        if acceptor.is_alive():
            acceptor.stop()
            acceptor.join(timeout)
        for member in self.topology.members():
            member.pool.close()
        if self.io.tee is not None:
            self.io.tee.close()
