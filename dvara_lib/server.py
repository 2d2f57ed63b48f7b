"""The arbiter: wires settings, discovery, pools, listeners, workers and the acceptor.

# design:
# The main thread builds everything, then waits on a SimpleQueue that the signal
# handlers only put into (SIGTERM, SIGINT: drain and exit). Threads: the acceptor, the
# discovery thread, the fixed ThreadPoolExecutor (all workers started up front, so the
# thread count never changes), and, when configured, the metrics emitter and the admin
# HTTP server.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from dvara_lib import __version__, auth, handoff, lifecycle, tls, wire
from dvara_lib.acceptor import Acceptor
from dvara_lib.client import Budget, ClientIO, Tee
from dvara_lib.config import check_port_range
from dvara_lib.discovery import DiscoveryThread, connect, discover, hello_request, run_hello
from dvara_lib.dispatch import Dispatcher
from dvara_lib.membership import PortBook, wanted_members
from dvara_lib.errors import ConfigError, ConnectionFailure, ProtocolError
from dvara_lib.metrics import MemberMetrics, Metrics
from dvara_lib.pidfile import LOCK_FD_ENV, PidFile
from dvara_lib.pool import Pool, PoolStats
from dvara_lib.relay import Relay
from dvara_lib.topology import Member, Topology, format_address

if TYPE_CHECKING:
    from dvara_lib.config import Settings

log = logging.getLogger("dvara.server")

_DISCOVERY_TIMEOUT = 10.0
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
#: How often the main thread checks that the threads it supervises are alive.
_SUPERVISE_INTERVAL = 0.5
#: Exit status when a thread the process cannot serve without has died.
EXIT_THREAD_DIED = 70
#: How long the drain may take when a thread died (clients are served no more anyway).
_DEAD_THREAD_DRAIN = 5.0


class _PoolMetrics(PoolStats):
    """Pool events as member measures (its open and in-use counts are read live)."""

    def __init__(self, stats: MemberMetrics) -> None:
        self.stats = stats

    def created(self) -> None:
        self.stats.incr("server.created")

    def closed(self) -> None:
        self.stats.incr("server.closed")

    def checkout_wait(self, seconds: float) -> None:
        self.stats.observe("server.checkout_wait", seconds)

    def checkout_timeout(self) -> None:
        self.stats.incr("server.checkout_timeouts")

    def held(self, seconds: float) -> None:
        self.stats.observe("server.held", seconds)


class Server:
    """One dvara process. Methods for callers: start(), run(), stop(), status()."""

    def __init__(self, settings: "Settings", metrics: Optional[Metrics] = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.topology: Optional[Topology] = None
        self.acceptor: Optional[Acceptor] = None
        self.discovery: Optional[DiscoveryThread] = None
        self.ports: Optional[PortBook] = None
        self.dispatcher: Optional[Dispatcher] = None
        self.io: Optional[ClientIO] = None
        self.started = time.time()
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._services: list[Any] = []
        self.relay: Optional[Relay] = None
        self.pidfile: Optional[PidFile] = None
        self.argv = list(sys.argv)
        self.cwd = os.getcwd()
        self._inherited = handoff.inherited_listeners()

    # -- start-up ---------------------------------------------------------------------------
    def start(self) -> None:
        """Discover the set, open a listener per member, start every thread.

        Can raise DiscoveryError or ConfigError.
        """
        s = self.settings
        _raise_fd_limit()
        tls.configure(s)                        # TLS and login on server connections
        auth.configure_backend(s)
        found = discover(list(s.addrs), timeout=min(_DISCOVERY_TIMEOUT, s.message_timeout))
        self.ports = PortBook(s.port_start, s.port_end, s.member_map, s.state_file)
        check_port_range(s, len([m for m in found.members if m not in self.ports.pinned]))
        self.topology = Topology(found.set_name)
        self.discovery = DiscoveryThread(
            self.topology, s.discovery_interval, _check_timeout(s.discovery_interval), __version__,
            reconcile=self.reconcile if found.set_name else None,
            monitor_threads=min(8, len(self.ports.ports) + len(s.member_map)), seeds=s.addrs)
        self._start_data_plane()
        self.topology.on_change(self.acceptor.topology_changed)
        self.topology.on_change(lambda m: m.stats.incr("topology.changes"))
        for real in found.members + self._mapped_extras(found.members):
            self._add_member(real, found.hellos.get(real))
        self.discovery.poll_once()
        self.acceptor.start()
        self.discovery.start()
        self._start_services()
        log.info("dvara %s serving replica set %s: %s", __version__,
                 found.set_name or "(standalone)",
                 ", ".join(f"{m.real} as {m.proxy}" for m in self.topology.members()))
        print(f"dvara is ready; connect with: {self.connection_string()}", flush=True)

    def connection_string(self) -> str:
        """The URI a client should use to reach the set through the proxy."""
        hosts = ",".join(m.proxy for m in self.topology.members())
        name = self.topology.set_name
        return f"mongodb://{hosts}/?" + (f"replicaSet={name}" if name else "directConnection=true")

    def _start_data_plane(self) -> None:
        """The relay, the workers and the acceptor (not started yet)."""
        s = self.settings
        tee = Tee(s.tee_file) if s.tee_file else None
        self.io = ClientIO(Budget(s.max_buffered_bytes), s.message_timeout, s.worker_linger, tee)
        self.relay = Relay(s, self.topology, self._handback,
                           on_server_failure=lambda m: self.discovery.wake(m),
                           on_state_change=self._state_changed)
        # As many pinned workers as one member's pins can need (each holds a connection).
        self.dispatcher = Dispatcher(s.workers, max(2, min(s.workers, s.max_connections)),
                                     self.relay.serve, self.relay.serve_parked)
        self.acceptor = Acceptor(s, self.dispatcher, self.relay, self.io)
        self.relay.others_waiting = self.dispatcher.waiting
        self.relay.acceptor_busy = lambda: self.acceptor.draining

    def _state_changed(self, member: Member, shutting_down: bool) -> None:
        """A relayed reply said member is no longer what clients think (SDAM error)."""
        self.topology.suspect(member)
        if shutting_down:
            member.pool.clear()
        self.discovery.wake(member)

    def _handback(self, client: Any, verdict: Any, parked: Any) -> None:
        self.acceptor.handback(client, verdict, parked)

    def _mapped_extras(self, members: list[str]) -> list[str]:
        """--member-map members the seeds did not list (hidden ones, say)."""
        return [real for real in self.ports.pinned if real not in members]

    # -- membership ---------------------------------------------------------------------------
    def reconcile(self, hellos: dict[str, Any], status_names: list[str]) -> None:
        """Follow the set: open listeners for new members, retire removed ones.

        Runs in the discovery thread. Nothing restarts as a whole.
        """
        current = {m.real: m for m in self.topology.members()}
        extra = status_names + list(self.ports.pinned)
        wanted = wanted_members(hellos, current, extra)
        added = [real for real in wanted if real not in current]
        removed = [m for real, m in current.items() if real not in wanted]
        for real in added:
            try:
                self._add_member(real, None)
            except ConfigError as exc:
                log.error("cannot proxy new member %s: %s", real, exc)
        for member in removed:
            self._remove_member(member)
        if added or removed:
            self.topology.refresh()
            self.discovery.wake()

    def _add_member(self, real: str, hello: Optional[dict[str, Any]]) -> Optional[Member]:
        s = self.settings
        port = self.ports.port_for(real, [m.proxy_port for m in self.topology.members()])
        if port is None:
            log.error("NO PORT LEFT for member %s: --port-start/--port-end %d-%d is too small "
                      "for the replica set; clients cannot reach this member through dvara",
                      real, s.port_start, s.port_end)
            return None
        stats = self.metrics.member(real)
        pool = Pool(real, lambda: self._connect(member), s.max_connections,
                    s.min_idle_connections, s.server_idle_timeout, _PoolMetrics(stats))
        stats.live_gauge("server.open", lambda: pool.open_count)
        stats.live_gauge("server.in_use", lambda: pool.in_use)
        member = Member(real, format_address(s.advertise_host, port), port, pool, stats)
        if hello is not None:
            member.max_wire_version = int(hello.get("maxWireVersion", 0))
        sock = _listen(s.listen_host, port, self._inherited)
        self.topology.add(member)
        self.acceptor.add_listener(sock, member)
        log.info("proxying member %s on %s", real, member.proxy)
        return member

    def _remove_member(self, member: Member) -> None:
        """Stop accepting for member; its clients finish what is in flight and are closed."""
        log.info("member %s left the replica set; closing its listener %s",
                 member.real, member.proxy)
        self.topology.remove(member)
        self.acceptor.retire(member)
        member.pool.close()
        self.metrics.forget(member.real)

    def _connect(self, member: Member) -> socket.socket:
        """A pooled server connection: TCP connect plus the proxy's own handshake."""
        timeout = self.settings.message_timeout
        auth.check_backoff(member.real)         # issue 7: no new connection while logins fail
        sock = connect(member.address, min(timeout, _DISCOVERY_TIMEOUT))
        try:
            hello = run_hello(sock, hello_request(member.max_wire_version, True, __version__))
            auth.login(sock, hello, member.real)    # issue 7: the proxy's own account
            wire.set_io_timeout(sock, timeout)
        except (ConnectionFailure, ProtocolError, OSError) as exc:
            sock.close()
            if isinstance(exc, ConnectionFailure):
                raise
            raise ConnectionFailure(f"handshake with {member.real} failed: {exc}") from exc
        return sock

    def _start_services(self) -> None:
        """The metrics emitter and admin endpoint, when configured."""
        from dvara_lib.services import start_services
        self._services = start_services(self.settings, self.metrics, self.status)

    # -- running ----------------------------------------------------------------------------
    def run(self) -> int:
        """Start, then serve until a stop signal or a handover. Returns the exit status."""
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, frame: self._signals.put(signum))
        if self.settings.pidfile:
            self.pidfile = PidFile(self.settings.pidfile)
            lock_fd = os.environ.pop(LOCK_FD_ENV, None)
            self.pidfile.acquire(int(lock_fd) if lock_fd else None)
        try:
            self.start()
            self._take_over_clients()
            if self.pidfile is not None:
                self.pidfile.write(os.getpid())
            lifecycle.notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
            return self._serve_signals()
        finally:
            if self.pidfile is not None:
                self.pidfile.release()

    def _serve_signals(self) -> int:
        """Act on signals and watch the threads; returns the exit status."""
        while True:
            try:
                signum = self._signals.get(timeout=_SUPERVISE_INTERVAL)
            except queue.Empty:
                dead = self._dead_thread()
                if dead is None:
                    continue
                log.critical("the %s thread died (see above); stopping so that cron or "
                             "systemd starts dvara again", dead)
                self.stop(min(self.settings.graceful_timeout, _DEAD_THREAD_DRAIN))
                return EXIT_THREAD_DIED
            if signum == signal.SIGHUP:
                lifecycle.reload(self)
            elif signum == signal.SIGUSR2:
                if lifecycle.replace_process(self):
                    log.info("handed over to the new process; exiting")
                    return 0
            else:
                log.info("received %s; draining", signal.Signals(signum).name)
                fast = signum == signal.SIGINT
                self.stop(self.settings.graceful_timeout / (4 if fast else 1))
                return 0

    def _dead_thread(self) -> Optional[str]:
        """The name of a thread dvara cannot serve without that is no longer alive."""
        threads = [self.acceptor, self.discovery] + [
            s for s in self._services if isinstance(s, threading.Thread)]
        for thread in threads:
            if thread is not None and not thread.is_alive():
                return thread.name
        return None

    def _take_over_clients(self) -> None:
        """If we replace an older dvara, adopt the idle clients it hands over."""
        path = os.environ.pop(handoff.HANDOFF_ENV, None)
        if not path:
            return

        def adopt(sock: socket.socket, meta: dict[str, Any]) -> None:
            member = self.topology.get(meta["member"])
            if member is None:
                sock.close()
                return
            self.acceptor.adopt(sock, meta, member)

        def run() -> None:
            count = handoff.receive(path, adopt, self.settings.graceful_timeout + 30)
            log.info("took over %d client connection(s) from the old process", count)

        threading.Thread(target=run, name="dvara-handoff", daemon=True).start()

    def apply_settings(self, settings: "Settings") -> None:
        """Use new settings for everything that can change while running (SIGHUP).

        Can raise ConfigError or OSError (the new metrics services could not start): then
        nothing changed.
        """
        old = self.settings
        if lifecycle.settings_changed_for_metrics(old, settings):
            self._restart_services(old, settings)
        self.settings = settings
        self.relay.apply_settings(settings)
        self.acceptor.settings = settings
        self.io.write_timeout = settings.message_timeout
        self.io.linger = settings.worker_linger
        self.io.budget.limit = settings.max_buffered_bytes
        logging.getLogger("dvara").setLevel(settings.log_level.upper())
        self.discovery.interval = settings.discovery_interval
        for member in self.topology.members():
            member.pool.resize(settings.max_connections, settings.min_idle_connections,
                               settings.server_idle_timeout)
            if settings.message_timeout != old.message_timeout:
                member.pool.clear()     # new connections take the new time-out

    def _restart_services(self, old: "Settings", new: "Settings") -> None:
        """Start the metrics services of new settings, then stop the old ones; if the new
        ones cannot start, the old ones keep running (and this raises)."""
        from dvara_lib.admin import AdminServer
        from dvara_lib.services import start_services
        keep_admin = old.admin_addr == new.admin_addr
        kept = [svc for svc in self._services if keep_admin and isinstance(svc, AdminServer)]
        started = start_services(new, self.metrics, self.status, skip_admin=keep_admin)
        for service in self._services:
            if service not in kept:
                service.close()
        self._services = kept + started

    def stop(self, timeout: float = 5.0, sender: Optional[handoff.Sender] = None) -> None:
        """Stop accepting; between two messages close every client (or hand it to the new
        process); wait up to timeout for messages in flight, then cut what is left. The
        workers are stopped before the acceptor closes its descriptors."""
        acceptor = self.acceptor
        if acceptor is not None and acceptor.is_alive():
            acceptor.drain(sender)
            if not acceptor.drained.wait(timeout):
                log.warning("%d client(s) still busy or pinned after %.1fs; closing them",
                            acceptor.counts()["clients"], timeout)
        if self.discovery is not None:
            self.discovery.close()
        for service in self._services:
            service.close()
        self._stop_workers()
        if acceptor is not None and acceptor.is_alive():
            acceptor.stop()
            acceptor.join(timeout)
        for member in self.topology.members() if self.topology else []:
            member.pool.close()
        if self.io is not None and self.io.tee is not None:
            self.io.tee.close()
        log.info("dvara stopped")

    def _stop_workers(self) -> None:
        """Cut what the workers still wait on, then stop them (bounded)."""
        if self.dispatcher is None:
            return
        if self.acceptor is not None:
            self.acceptor.abort_busy()
        for member in self.topology.members() if self.topology else []:
            member.pool.abort()
        self.dispatcher.shutdown(wait_seconds=_DEAD_THREAD_DRAIN)

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The /status document (see dvara_lib.admin)."""
        from dvara_lib.services import status_document
        return status_document(self)


def _listen(host: str, port: int, inherited: dict[int, int]) -> socket.socket:
    """A listening socket for one member (inherited on a graceful restart).

    Can raise ConfigError if the port is taken.
    """
    if port in inherited:
        return socket.socket(fileno=inherited.pop(port))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise ConfigError(f"--port-start/--port-end: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from exc


def _raise_fd_limit() -> None:
    """Every client costs a descriptor: use the hard limit, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
    log.debug("open-files limit: %d", max(soft, hard))


def _check_timeout(interval: float) -> float:
    """How long one member check may take: long enough for a busy server, short enough
    to notice a hung one within a few intervals (checks run in parallel)."""
    return min(max(2 * interval, 2.0), 10.0)
