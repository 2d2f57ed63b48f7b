"""The arbiter: discovery, listeners, signals and services around the data plane.

# design:
# The main thread builds everything, then waits on a SimpleQueue that the signal
# handlers only put into, and watches the threads (and processes) it cannot serve
# without. It owns discovery (the set's members and their states), the listeners (one
# per member, opened or inherited here), the pidfile, the metrics services and the
# graceful restart. The clients are served by a plane: with --processes 1 a DataPlane
# in this process (its acceptor and fixed worker pool share the Member objects with
# discovery); with --processes N a WorkerSet of N worker processes, each running a
# DataPlane of its own that this process feeds with members, states and settings.
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

from dvara_lib import __version__, wire
from dvara_lib.address import format_address
from dvara_lib.backend.connect import Backend
from dvara_lib.backend.discovery import Discovered, DiscoveryThread, discover
from dvara_lib.backend.membership import PortBook, wanted_members
from dvara_lib.backend.topology import Member, Topology
from dvara_lib.config import check_port_range
from dvara_lib.errors import ConfigError
from dvara_lib.observe.admin import AdminServer
from dvara_lib.observe.metrics import Metrics
from dvara_lib.process import handoff, lifecycle
from dvara_lib.process.pidfile import LOCK_FD_ENV, PidFile
from dvara_lib.process.services import start_services, status_document
from dvara_lib.proxy.dataplane import DataPlane, pin_to_cpu
from dvara_lib.security import tls

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


class Server:
    """One dvara. Methods for callers: start(), run(), stop(), status()."""

    def __init__(self, settings: "Settings", metrics: Optional[Metrics] = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.topology: Optional[Topology] = None
        self.discovery: Optional[DiscoveryThread] = None
        self.ports: Optional[PortBook] = None
        self.plane: Any = None           # a DataPlane, or a WorkerSet (--processes N)
        #: proxy port -> its listening sockets, one per process (SO_REUSEPORT: the
        #: kernel spreads a port's new connections over the processes)
        self.listeners: dict[int, list[socket.socket]] = {}
        self.started = time.time()
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._services: list[Any] = []
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
        tls.listener_context(s)                 # bad client-side files stop us before discovery
        self.backend = Backend.from_settings(s, __version__)
        found = discover(self.backend, list(s.addrs),
                         timeout=min(_DISCOVERY_TIMEOUT, s.message_timeout))
        balanced = _check_balanced(s, found)
        self.ports = PortBook(s.port_start + balanced, s.port_end, s.member_map, s.state_file)
        check_port_range(s, balanced + len([m for m in found.members
                                            if m not in self.ports.pinned]))
        self.topology = Topology(found.set_name, routers=found.routers)
        self.discovery = DiscoveryThread(
            self.topology, s.discovery_interval, _check_timeout(s.discovery_interval),
            self.backend,
            reconcile=self.reconcile if found.set_name else None,
            monitor_threads=min(8, len(self.ports.ports) + len(s.member_map)), seeds=s.addrs)
        self.plane = self._make_plane()
        self.discovery.on_checked = self._checked
        self.topology.on_change(lambda m: m.stats.incr("topology.changes"))
        for real in found.members + self._mapped_extras(found.members):
            self._add_member(real, found.hellos.get(real))
        if balanced:
            self._open_balanced()
        self.discovery.poll_once()
        self.plane.start()
        self.discovery.start()
        self._start_services()
        log.info("dvara %s serving %s: %s", __version__, _served(found),
                 ", ".join(f"{m.real} as {m.proxy}" for m in self.topology.members()))
        _log_compressors()
        print(f"dvara is ready; connect with: {self.connection_string()}", flush=True)

    def _make_plane(self) -> Any:
        if self.settings.processes > 1:
            from dvara_lib.process.workers import WorkerSet
            return WorkerSet(self.settings, self.topology, self.metrics, self.discovery.wake)
        cpu = pin_to_cpu(self.settings.cpu_affinity, 0)
        if cpu is not None:
            log.info("serving on CPU %d (--cpu-affinity)", cpu)
        return DataPlane(self.settings, self.topology, self.metrics, self.discovery.wake,
                         self.backend)

    def connection_string(self) -> str:
        """The URI a client should use to reach the set (or the routers) through the proxy."""
        if self.settings.load_balanced:
            port = self.settings.port_start
            return f"mongodb://{format_address(self.settings.advertise_host, port)}/" \
                   "?loadBalanced=true"
        hosts = ",".join(m.proxy for m in self.topology.members())
        if self.topology.routers:
            return f"mongodb://{hosts}/"
        name = self.topology.set_name
        return f"mongodb://{hosts}/?" + (f"replicaSet={name}" if name else "directConnection=true")

    def _open_balanced(self) -> None:
        """--load-balanced: one listener on --port-start for every router."""
        s = self.settings
        socks = _listen(s.listen_host, s.port_start, self._inherited.pop(s.port_start, []), 1)
        self.listeners[s.port_start] = socks
        name = format_address(s.advertise_host, s.port_start)
        self.plane.add_balanced_listener(socks[0], name)
        log.info("load-balanced listener for every router on %s", name)

    def _checked(self, member: Member, was_up: bool) -> None:
        """A check of member was applied (discovery thread): the pools follow it; with
        --load-balanced, the clients of a router that went down are closed."""
        self.plane.checked(member, was_up)
        if self.settings.load_balanced and was_up and not member.up:
            self.plane.close_clients(member)

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
        socks = _listen(s.listen_host, port, self._inherited.pop(port, []), s.processes)
        self.listeners[port] = socks
        max_wire = int(hello.get("maxWireVersion", 0)) if hello is not None else 0
        member = self.plane.add_member(real, format_address(s.advertise_host, port), port,
                                       socks, max_wire)
        log.info("proxying member %s on %s", real, member.proxy)
        return member

    def _remove_member(self, member: Member) -> None:
        """Stop accepting for member; its clients finish what is in flight and are closed."""
        log.info("member %s left the replica set; closing its listener %s",
                 member.real, member.proxy)
        self.plane.remove_member(member)
        socks = self.listeners.pop(member.proxy_port, [])
        if self.settings.processes > 1:
            for sock in socks:          # with one process the acceptor closes it
                sock.close()

    def listener_fds(self) -> dict[int, list[int]]:
        """proxy port → listening socket fds, for the process that will replace this one."""
        return {port: [s.fileno() for s in socks] for port, socks in list(self.listeners.items())}

    def _start_services(self) -> None:
        """The metrics emitter and admin endpoint, when configured."""
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
        dead = self.plane.dead_thread()
        if dead is not None:
            return dead
        threads = [self.discovery] + [s for s in self._services if isinstance(s, threading.Thread)]
        for thread in threads:
            if thread is not None and not thread.is_alive():
                return thread.name
        return None

    def _take_over_clients(self) -> None:
        """If we replace an older dvara, adopt the idle clients it hands over."""
        path = os.environ.pop(handoff.HANDOFF_ENV, None)
        if not path:
            return

        def run() -> None:
            count = handoff.receive(path, self.plane.adopt, self.settings.graceful_timeout + 30)
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
        logging.getLogger("dvara").setLevel(settings.log_level.upper())
        self.discovery.interval = settings.discovery_interval
        self.plane.apply_settings(settings)

    def _restart_services(self, old: "Settings", new: "Settings") -> None:
        """Start the metrics services of new settings, then stop the old ones; if the new
        ones cannot start, the old ones keep running (and this raises)."""
        keep_admin = old.admin_addr == new.admin_addr
        kept = [svc for svc in self._services if keep_admin and isinstance(svc, AdminServer)]
        started = start_services(new, self.metrics, self.status, skip_admin=keep_admin)
        for service in self._services:
            if service not in kept:
                service.close()
        self._services = kept + started

    def stop(self, timeout: float = 5.0, sender: Optional[handoff.Sender] = None) -> None:
        """Stop accepting; between two messages close every client (or hand it to the new
        process); wait up to timeout for messages in flight, then close everything."""
        if self.discovery is not None:
            self.discovery.close()
        if self.plane is not None:
            self.plane.stop(timeout, sender)
        for service in self._services:
            service.close()
        log.info("dvara stopped")

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The /status document (see dvara_lib.observe.admin)."""
        plane = self.plane.status() if self.plane is not None else {}
        return status_document(self.settings, self.started, self.topology, plane,
                               self.metrics.counter_totals())


def _check_balanced(settings: "Settings", found: Discovered) -> int:
    """1 if --load-balanced (its listener takes --port-start), else 0. Can raise
    ConfigError: the mode needs mongos routers."""
    if not settings.load_balanced:
        return 0
    if not found.routers:
        raise ConfigError("--load-balanced: the seeds are not mongos routers "
                          f"(they are {_served(found)}); it serves routers only")
    return 1


def _served(found: Discovered) -> str:
    if found.routers:
        return "mongos routers"
    return f"replica set {found.set_name}" if found.set_name else "a standalone server"


def _listen(host: str, port: int, inherited: list[int], count: int) -> list[socket.socket]:
    """count listening sockets on one port (SO_REUSEPORT), the ones the process we replace
    passed down first. Can raise ConfigError if the port is taken.

    With SO_REUSEPORT a second dvara could bind the same port without an error and take
    half its clients: the port is first bound once without it, to be sure it is free.
    """
    socks = [socket.socket(fileno=fd) for fd in inherited]
    for extra in socks[count:]:
        extra.close()               # the new dvara runs fewer processes than the old one
    socks = socks[:count]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if not socks:
            socket.create_server((host, port), family=family).close()
        while len(socks) < count:
            socks.append(socket.create_server((host, port), family=family, backlog=4096,
                                              reuse_port=True))
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ConfigError(f"--port-start/--port-end: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from exc
    return socks


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


def _log_compressors() -> None:
    """Say once which compressors clients are offered, and which library each missing one
    needs."""
    missing = [f"{name} (needs {package})" for name, package in wire.COMPRESSOR_PACKAGES.items()
               if name not in wire.SUPPORTED_COMPRESSORS]
    log.info("compressors offered to clients: %s%s", ", ".join(wire.SUPPORTED_COMPRESSORS),
             "; not offered: " + ", ".join(missing) if missing else "")
