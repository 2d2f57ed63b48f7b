"""The arbiter: wires settings, discovery, pools, listeners, workers and the acceptor.

# design:
# The main thread builds everything, then waits on a SimpleQueue that the signal
# handlers only put into (SIGTERM, SIGINT: drain and exit). Threads: the acceptor, the
# discovery thread, the fixed ThreadPoolExecutor (all workers started up front, so the
# thread count never changes), and, when configured, the metrics emitter and the admin
# HTTP server.
"""

from __future__ import annotations

import concurrent.futures
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
from dvara_lib.client import TEE
from dvara_lib.config import check_port_range
from dvara_lib.discovery import (DiscoveryThread, connect, discover, hello_request,
                                 run_hello, start_thread_pool)
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


class _PoolMetrics(PoolStats):
    """Pool events as member measures."""

    def __init__(self, stats: MemberMetrics) -> None:
        self.stats = stats

    def created(self) -> None:
        self.stats.incr("server.created")
        self.stats.gauge_add("server.open", 1)

    def closed(self) -> None:
        self.stats.incr("server.closed")
        self.stats.gauge_add("server.open", -1)

    def checkout_wait(self, seconds: float) -> None:
        self.stats.observe("server.checkout_wait", seconds)
        self.stats.gauge_add("server.in_use", 1)

    def checkout_timeout(self) -> None:
        self.stats.incr("server.checkout_timeouts")

    def held(self, seconds: float) -> None:
        self.stats.observe("server.held", seconds)
        self.stats.gauge_add("server.in_use", -1)


class Server:
    """One dvara process. Methods for callers: start(), run(), stop(), status()."""

    def __init__(self, settings: "Settings", metrics: Optional[Metrics] = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.topology: Optional[Topology] = None
        self.acceptor: Optional[Acceptor] = None
        self.discovery: Optional[DiscoveryThread] = None
        self.ports: Optional[PortBook] = None
        self.executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
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
        TEE.open(s.tee_file)
        tls.configure(s)                        # issue 7: TLS and login on server connections
        auth.configure_backend(s)
        found = discover(list(s.addrs), timeout=min(_DISCOVERY_TIMEOUT, s.message_timeout))
        self.ports = PortBook(s.port_start, s.port_end, s.member_map, s.state_file)
        check_port_range(s, len([m for m in found.members if m not in self.ports.pinned]))
        self.topology = Topology(found.set_name)
        self.executor = start_thread_pool(s.workers, "dvara-worker")
        self.discovery = DiscoveryThread(
            self.topology, s.discovery_interval, _check_timeout(s.discovery_interval), __version__,
            reconcile=self.reconcile if found.set_name else None,
            monitor_threads=min(8, len(self.ports.ports) + len(s.member_map)), seeds=s.addrs)
        self.relay = Relay(s, self.topology, self._handback,
                           on_server_failure=lambda m: self.discovery.wake(),
                           on_state_change=self._state_changed)
        self.acceptor = Acceptor(s, self.executor, self.relay)
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

    def _state_changed(self, member: Member, shutting_down: bool) -> None:
        """A relayed reply said member is no longer what clients think (SDAM error)."""
        self.topology.suspect(member)
        if shutting_down:
            member.pool.clear()
        self.discovery.wake()

    def _handback(self, client: Any, verdict: str) -> None:
        self.acceptor.handback(client, verdict)

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
        while True:
            try:
                signum = self._signals.get(timeout=1.0)
            except queue.Empty:
                continue
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
        """Use new settings for everything that can change while running (SIGHUP)."""
        old, self.settings = self.settings, settings
        self.relay.settings = self.acceptor.settings = settings
        logging.getLogger("dvara").setLevel(settings.log_level.upper())
        self.discovery.interval = settings.discovery_interval
        for member in self.topology.members():
            member.pool.resize(settings.max_connections, settings.min_idle_connections,
                               settings.server_idle_timeout)
        if lifecycle.settings_changed_for_metrics(old, settings):
            for service in self._services:
                service.close()
            self._start_services()

    def stop(self, timeout: float = 5.0, sender: Optional[handoff.Sender] = None) -> None:
        """Stop accepting; between two messages close every client (or hand it to the new
        process); wait up to timeout for messages in flight, then close everything."""
        if self.acceptor is not None and self.acceptor.is_alive():
            self.acceptor.drain(sender)
            if not self.acceptor.drained.wait(timeout):
                log.warning("%d client(s) still busy or pinned after %.1fs; closing them",
                            self.acceptor.counts()["clients"], timeout)
            self.acceptor.stop()
            self.acceptor.join(timeout)
        if self.discovery is not None:
            self.discovery.close()
        for service in self._services:
            service.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        for member in self.topology.members() if self.topology else []:
            member.pool.close()
        log.info("dvara stopped")

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
