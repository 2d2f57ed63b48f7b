"""The acceptor thread: the only owner of the selector, the listeners and idle clients.

# design:
# The acceptor thread owns the selector and every idle or parked client. Each client
# socket is registered once, one-shot, for its whole life: an event disarms it. On an
# event the acceptor reads what an idle client sent (non-blocking) and assembles whole
# frames; only a complete message is handed, with the client, to the workers
# (``Dispatcher``), so thousands of idle clients cost no thread; a client that sent
# less is armed again. While a worker owns a client its registration stays disarmed,
# so the client's next messages, which the worker may read itself, wake nobody here.
# A worker that is done gives the client back by itself: ``ClientConn.release`` arms
# the registration again (``rearm``, one epoll_ctl: the only selector call another
# thread makes; registering, unregistering and the selector's map stay this thread's).
# An event that comes in the instant between that and the worker letting go is noted
# on the client, and the worker reads what came. The worker hands the client to this
# thread (``handback``: a SimpleQueue plus an eventfd) only when there is work here:
# an awaitable hello to park, a client to close, a drain under way, bytes it may not
# read because the buffer budget is spent. Parked hellos wait here, with no worker and
# no server connection, until their member changes or their time is up.
#
# Buffer budget: while the bytes buffered for incomplete messages exceed
# --max-buffered-bytes, a client in the middle of a message is not read (TCP pushes
# back) except one, the favoured, which may finish its message; clients between
# messages are read a little at a time, so small messages keep flowing.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import os
import queue
import select
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib.proxy import gate
from dvara_lib.proxy import handover
from dvara_lib.proxy import legacy
from dvara_lib.proxy.clienttls import ClientTLS
from dvara_lib.proxy.client import ClientConn, ClientIO, Fill, ParkedHello, Verdict
from dvara_lib.errors import ProtocolError

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.proxy.dispatch import Dispatcher
    from dvara_lib.proxy.relay import Relay
    from dvara_lib.backend.topology import Member

log = logging.getLogger("dvara.acceptor")

_HOUSEKEEPING_INTERVAL = 0.5
_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF = 0.1
_READ_LIMIT = 1024 * 1024       # read at most this much of one client per event (fairness)
_SMALL_READ = 16 * 1024         # what a client between messages may send while over budget
_THROTTLE_POLL = 0.05           # how often throttled clients are looked at while over budget
_ONE_SHOT = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
#: Event bits that say the peer closed or the socket failed: read it to the end.
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class _OneShotSelector(selectors.EpollSelector):
    """The stdlib epoll selector, plus one-shot registrations (which the selectors API
    cannot express): after an event a registration stays disarmed until ``rearm``; and
    ``ready``, which also gives each event's epoll bits (a hang-up is seen with them)."""

    def ready(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        keys = self.get_map()
        try:
            events = self._selector.poll(timeout, max(len(keys), 1))
        except InterruptedError:
            return []
        return [(keys[fd], bits) for fd, bits in events if fd in keys]

    def register_one_shot(self, fileobj: Any, data: Any) -> None:
        key = self.register(fileobj, selectors.EVENT_READ, data)
        try:
            self.rearm(key.fd)
        except OSError:
            self.unregister(fileobj)
            raise

    def rearm(self, fd: int) -> None:
        """Arm fd's registration for one more event (thread-safe: one epoll_ctl)."""
        self._selector.modify(fd, _ONE_SHOT)


class _Listener:
    """A member's listener, or (member None) the --load-balanced one: choose() then says
    which routers its new clients may be bound to."""

    __slots__ = ("sock", "member", "name", "choose")

    def __init__(self, sock: socket.socket, member: Optional["Member"], name: str,
                 choose: Optional[Callable[[], list["Member"]]] = None) -> None:
        self.sock = sock
        self.member = member
        self.name = name
        self.choose = choose


class Acceptor(threading.Thread):
    """Accepts clients, reads their messages, hands whole messages to the workers.

    Methods for other threads: add_listener, add_balanced_listener, retire, close_clients,
    handback, topology_changed, drain, adopt, stop, call_soon (and, reading snapshots,
    listener_fds, counts, clients_per_member). Everything else runs in this thread only.
    """

    def __init__(self, settings: "Settings", dispatcher: "Dispatcher", relay: "Relay",
                 io: ClientIO) -> None:
        super().__init__(name="dvara-acceptor", daemon=True)
        self.settings = settings
        self.dispatcher = dispatcher
        self.relay = relay
        self.io = io
        self.tls = ClientTLS.from_settings(settings)   # client TLS, or None
        self._selector = _OneShotSelector()
        io.rearm = self.rearm
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_lock = threading.Lock()
        self._wake_fd: Optional[int] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        self._listeners: dict[Optional["Member"], _Listener] = {}   # None: load-balanced
        self._clients: set[ClientConn] = set()      # every open client
        self._per_member: collections.Counter["Member"] = collections.Counter()
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._parked: dict[int, ClientConn] = {}    # client id -> client with a parked hello
        self._deadlines: list[tuple[float, int, int]] = []   # (deadline, seq, client id)
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._throttled: dict[ClientConn, None] = {}   # not read: the budget is spent
        self._more: dict[ClientConn, None] = {}        # read up to the fairness limit
        self._favoured: Optional[ClientConn] = None
        self._running = True
        self.draining = False
        self._accept_error_logged = 0.0
        self._sender: Optional[handover.ClientSink] = None
        self.drained = threading.Event()
        self._next_housekeeping = 0.0

    # -- API for other threads ------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn in the acceptor thread (never, once the acceptor has stopped)."""
        with self._wake_lock:
            if self._wake_fd is None:
                return
            self._calls.put(fn)
            os.eventfd_write(self._wake_fd, 1)

    def add_listener(self, sock: socket.socket, member: "Member") -> None:
        sock.setblocking(False)
        self.call_soon(lambda: self._add_listener(_Listener(sock, member, member.proxy)))

    def add_balanced_listener(self, sock: socket.socket, name: str,
                              choose: Callable[[], list["Member"]]) -> None:
        """One listener for several members (--load-balanced): each new client is bound,
        for its whole life, to the member of choose() with the fewest clients."""
        sock.setblocking(False)
        self.call_soon(lambda: self._add_listener(_Listener(sock, None, name, choose)))

    def close_clients(self, member: "Member", why: str) -> None:
        """Close member's clients (each after its message in flight); keep its listener."""
        self.call_soon(lambda: self._close_clients(member, why))

    def handback(self, client: ClientConn, verdict: Verdict,
                 parked: Optional[ParkedHello] = None) -> None:
        """Called by a worker that hands client to the acceptor (it owns it no more)."""
        self.call_soon(lambda: self._resume(client, verdict, parked))

    def retire(self, member: "Member") -> None:
        """Close member's listener; its clients finish their message in flight, then close."""
        self.call_soon(lambda: self._retire(member))

    def topology_changed(self, member: "Member") -> None:
        self.call_soon(lambda: self._answer_parked(member))

    def drain(self, sender: Optional[handover.ClientSink] = None) -> None:
        """Stop accepting; between two messages, close each client (or, with a sender,
        move it to the process that replaces this one); set ``drained`` when none is left.
        """
        self.call_soon(lambda: self._begin_drain(sender))

    def adopt(self, sock: socket.socket, meta: dict[str, Any], member: "Member") -> None:
        """Take over a client handed over by the process this one replaces."""
        self.call_soon(lambda: self._adopt(sock, meta, member))

    def rearm(self, client: ClientConn) -> None:
        """Called by the worker that owns client as it lets go: tell the acceptor of the
        client's next bytes. The one selector call made outside this thread."""
        self._selector.rearm(client.sock.fileno())

    def abort_busy(self) -> None:
        """Cut the sockets of clients a worker still holds, so that the worker fails fast
        (the end of a drain that timed out)."""
        for client in list(self._clients):
            if client.busy:
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._running = False
        self.call_soon(lambda: None)

    def listener_fds(self) -> dict[int, int]:
        """proxy port → listening socket fd, for the process that will replace this one."""
        return {member.proxy_port: listener.sock.fileno()
                for member, listener in list(self._listeners.items()) if member is not None}

    def counts(self) -> dict[str, int]:
        clients = list(self._clients)
        return {"clients": len(clients), "busy": sum(1 for c in clients if c.busy)}

    def clients_per_member(self) -> dict[str, int]:
        """Open clients per real member address (read without a lock: a snapshot)."""
        counts: dict[str, int] = {}
        for member, n in list(self._per_member.items()):    # a member re-added: two keys
            counts[member.real] = counts.get(member.real, 0) + n
        return counts

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self._running:
                for key, bits in self._selector.ready(self._timeout()):
                    self._dispatch_event(key, bits)
                self._read_throttled()
                self._housekeeping()
        except Exception:
            log.exception("acceptor failed")
            raise
        finally:
            self._shutdown()

    def _timeout(self) -> float:
        """How long select may wait: until the next timer, deadline or housekeeping."""
        if self._more:
            return 0.0
        if self._throttled:
            return _THROTTLE_POLL if self.io.budget.spent else 0.0
        now = time.monotonic()
        when = self._next_housekeeping
        if self._deadlines:
            when = min(when, self._deadlines[0][0])
        if self._timers:
            when = min(when, self._timers[0][0])
        return max(0.0, min(when - now, _HOUSEKEEPING_INTERVAL))

    def _dispatch_event(self, key: selectors.SelectorKey, bits: int) -> None:
        data = key.data
        if data is None:
            self._run_calls()
        elif isinstance(data, _Listener):
            if self._listeners.get(data.member) is data:   # not closed earlier in this batch
                self._accept(data)
        elif not data.closed and not data.readable_while_busy():
            self._advance(data, unread=True, hangup=bool(bits & _HANGUP))

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            _guarded(fn, "acceptor callback")

    # -- listeners and accepting ------------------------------------------------------------
    def _add_listener(self, listener: _Listener) -> None:
        self._listeners[listener.member] = listener
        if not self.draining:
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _remove_listener(self, member: Optional["Member"]) -> None:
        listener = self._listeners.pop(member, None)
        if listener is not None:
            self._unregister(listener.sock)
            listener.sock.close()

    def _retire(self, member: "Member") -> None:
        self._remove_listener(member)
        self._close_clients(member, "member left the replica set")

    def _close_clients(self, member: "Member", why: str) -> None:
        for client in [c for c in self._clients if c.member is member]:
            client.closing = True
            self._close(client, why)

    def _accept(self, listener: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(listener, exc)
                return
            member = listener.member or self._least_loaded(listener)
            if member is None:
                log.warning("no router is up for a client on %s; closing it", listener.name)
                sock.close()
                continue
            self._admit(sock, peer, member)

    def _least_loaded(self, listener: _Listener) -> Optional["Member"]:
        """The member of a load-balanced listener with the fewest clients (None if none)."""
        members = listener.choose() if listener.choose is not None else []
        return min(members, key=lambda m: self._per_member[m], default=None)

    def _accept_failed(self, listener: _Listener, exc: OSError) -> None:
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
            return
        now = time.monotonic()
        if now - self._accept_error_logged >= 1.0:   # at most one line a second
            self._accept_error_logged = now
            log.error("accept on %s failed: %s; retrying every %.1fs", listener.name,
                      exc, _ACCEPT_BACKOFF)
        self._unregister(listener.sock)
        self._later(_ACCEPT_BACKOFF, lambda: self._reregister_listener(listener))

    def _reregister_listener(self, listener: _Listener) -> None:
        if self._listeners.get(listener.member) is listener and not self.draining:
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _admit(self, sock: socket.socket, peer: tuple, member: "Member") -> None:
        ip = str(peer[0])
        reason = None
        if len(self._clients) >= self.settings.max_client_connections:
            reason = "--max-client-connections"
        elif self._per_ip[ip] >= self.settings.max_per_client_connections:
            reason = "--max-per-client-connections"
        if reason is not None:
            member.stats.incr("clients.rejected")
            log.warning("rejected a client from %s on %s: %s reached", ip, member.proxy, reason)
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client = ClientConn(sock, peer, member, self.io)
        self._register(client)
        if self.tls is not None:                # TLS handshake, run by client.fill()
            self.tls.admit(client)
            self._later(self.tls.handshake_timeout, lambda: self.tls.handshaking(client)
                        and self._close(client, "no TLS handshake in time"))
        log.debug("accepted %s", client)

    def _register(self, client: ClientConn) -> None:
        try:
            self._selector.register_one_shot(client.sock, client)
        except (OSError, ValueError) as exc:
            log.error("cannot watch %s: %s; closing it", client, exc)
            client.close()
            return
        self._clients.add(client)
        self._per_ip[client.peer_ip] += 1
        self._per_member[client.member] += 1
        client.member.stats.incr("clients.connects")
        client.member.stats.gauge_add("clients.connected", 1)

    # -- clients ----------------------------------------------------------------------------
    def _advance(self, client: ClientConn, unread: bool, hangup: bool = True) -> None:
        """Move a client this thread owns along: read if its socket may hold more, then
        hand its next whole message to the workers (unless a hello of its is parked), or
        arm its registration for its next bytes."""
        if unread:
            limit = self._read_limit(client)
            if limit == 0:
                self._throttled[client] = None
                return
            self._throttled.pop(client, None)
            status = client.fill(limit, to_the_end=hangup)
            if status is Fill.CLOSED:
                if client.parked is not None or not client.has_frame():
                    self._close(client, "disconnected")
                    return
                client.closing = True   # it is done sending: serve what it sent, then close
            unread = status is Fill.MORE
        if client.parked is None:
            if self._submit_if_ready(client, unread):
                return
        else:
            client.settle()             # what a parked client sends waits in its buffer
        if unread:
            self._more[client] = None       # the rest at the next turn of the loop
            return
        try:
            self._selector.rearm(client.sock.fileno())
        except OSError as exc:
            log.debug("cannot watch %s any more (%s); closing it", client, exc)
            self._close(client, "gone")

    def _submit_if_ready(self, client: ClientConn, unread: bool) -> bool:
        """Hand client's next whole message to the workers; False if none is buffered."""
        try:
            frame = client.next_frame()
        except ProtocolError as exc:
            client.member.stats.incr("errors.bad_frame")
            log.warning("closing %s: %s", client, exc)
            self._close(client, "bad frame")
            return True
        if frame is None:
            return False
        if client is self._favoured:
            self._favoured = None
        client.pending = unread
        client.take()
        self.dispatcher.submit(client, frame)
        return True

    def _read_limit(self, client: ClientConn) -> int:
        """How much of client to read now, under the buffer budget (0: not now)."""
        budget = self.io.budget
        if client is self._favoured:
            return _READ_LIMIT
        if not budget.spent:
            return min(_READ_LIMIT, max(_SMALL_READ, budget.limit - budget.used))
        if not client.mid_message():
            return _SMALL_READ
        favoured = self._favoured
        if favoured is None or favoured.closed or not favoured.mid_message():
            self._favoured = client     # this one may finish its message
            return _READ_LIMIT
        if time.monotonic() - favoured.last_active > self.settings.message_timeout:
            self._close(favoured, "half a message, then nothing for --message-timeout, "
                                  "while the buffers are full")
            self._favoured = client
            return _READ_LIMIT
        return 0

    def _read_throttled(self) -> None:
        """Read on clients that were stopped at the fairness limit, and those held back
        by the budget once it allows."""
        more, self._more = self._more, {}
        waiting = list(self._throttled) if not self.io.budget.spent or self._favoured is None \
            else ([self._favoured] if self._favoured in self._throttled else [])
        for client in list(more) + waiting:
            if client in self._clients and not client.busy:
                self._advance(client, unread=True)

    def _resume(self, client: ClientConn, verdict: Verdict,
                parked: Optional[ParkedHello]) -> None:
        """A worker hands client back: close it, park its hello, or move it along."""
        with client.lock:
            unread, client.pending, client.busy = client.pending, False, False
        if verdict is Verdict.CLOSE or client.closing or client.closed:
            self._close(client, "closed by proxy" if verdict is Verdict.CLOSE else "closing")
        elif verdict is Verdict.PARK:
            self._park(client, parked)
            self._advance(client, unread)   # watched while parked (an end of stream)
        elif not self.draining:
            self._advance(client, unread)
        self._check_drained()

    def _park(self, client: ClientConn, parked: ParkedHello) -> None:
        client.parked = parked
        self._parked[client.id] = client
        heapq.heappush(self._deadlines, (parked.deadline, next(self._seq), client.id))
        client.member.stats.gauge_add("hello.parked", 1)

    def _answer_parked(self, member: Optional["Member"]) -> None:
        """Answer parked hellos of member whose answer changed (all members if None)."""
        for client in list(self._parked.values()):
            if member is not None and client.member is not member:
                continue
            if member is not None and client.parked.counter == member.counter:
                continue
            self._unpark(client)

    def _unpark(self, client: ClientConn) -> None:
        parked = self._forget_parked(client)
        client.take()
        self.dispatcher.submit_parked(client, parked)

    def _forget_parked(self, client: ClientConn) -> ParkedHello:
        parked, client.parked = client.parked, None
        del self._parked[client.id]
        client.member.stats.gauge_add("hello.parked", -1)
        if len(self._deadlines) > 2 * len(self._parked) + 64:   # drop stale entries
            self._deadlines = [d for d in self._deadlines if d[2] in self._parked]
            heapq.heapify(self._deadlines)
        return parked

    def _close(self, client: ClientConn, why: str) -> None:
        """Close a client this thread owns; one a worker owns is closed when handed back."""
        if client not in self._clients:
            return
        if client.busy:
            client.closing = True
            return
        self._clients.discard(client)
        self._throttled.pop(client, None)
        self._more.pop(client, None)
        if client is self._favoured:
            self._favoured = None
        self._per_ip[client.peer_ip] -= 1
        if self._per_ip[client.peer_ip] <= 0:
            del self._per_ip[client.peer_ip]
        self._per_member[client.member] -= 1
        if self._per_member[client.member] <= 0:
            del self._per_member[client.member]
        if client.parked is not None:
            self._forget_parked(client)
        if client.pinned is not None:
            self.relay.release_pin(client, reusable=not client.buf)
        self._unregister(client.sock)
        client.close()
        stats = client.member.stats
        stats.incr("clients.disconnects")
        stats.gauge_add("clients.connected", -1)
        log.debug("closed %s: %s", client, why)
        self._check_drained()

    def _unregister(self, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- timers -----------------------------------------------------------------------------
    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _guarded(heapq.heappop(self._timers)[2], "acceptor timer")
        while self._deadlines and self._deadlines[0][0] <= now:
            client = self._parked.get(heapq.heappop(self._deadlines)[2])
            if client is not None and client.parked.deadline <= now:
                self._unpark(client)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_INTERVAL
            self._expire_idle(now)
            self._check_drained()       # clients a worker let go since the drain began

    def _expire_idle(self, now: float) -> None:
        idle_cutoff = now - self.settings.client_idle_timeout
        for client in list(self._clients):
            if client.busy:
                continue
            if client.closing:              # a worker let it go just as it was retired
                self._close(client, "closing")
                continue
            if client.pinned is not None and client.pin_deadline <= now:
                client.member.stats.incr("gle.pin_timeouts")
                self.relay.release_pin(client, reusable=True)
            if client.parked is None and client.last_active < idle_cutoff:
                client.member.stats.incr("clients.idle_timeouts")
                self._close(client, "idle timeout")

    # -- draining and shutdown --------------------------------------------------------------
    def _begin_drain(self, sender: Optional[handover.ClientSink]) -> None:
        self.draining = True
        self._sender = sender
        for member in list(self._listeners):
            self._remove_listener(member)
        self._check_drained()

    def _check_drained(self) -> None:
        """While draining: let go of every client that is between two messages."""
        if not self.draining:
            return
        for client in list(self._clients):
            if client in self._clients and not client.busy and client.pinned is None:
                self._let_go(client)
        if not self._clients:
            self.drained.set()

    def _let_go(self, client: ClientConn) -> None:
        """Move client to the new process if there is one and it can move, else close it."""
        sender = self._sender
        meta = None if sender is None else handover.describe(client)
        if sender is None or meta is None:
            self._close(client, "draining")
            return
        self._unregister(client.sock)
        moved = sender.send_client(client.sock, meta)
        self._close(client, "handed to the new process" if moved else "draining")

    def _adopt(self, sock: socket.socket, meta: dict[str, Any], member: "Member") -> None:
        sock.setblocking(True)
        client = ClientConn(sock, tuple(meta["peer"]), member, self.io)
        client.took(meta["buf"])
        client.compressors = list(meta.get("compressors") or [])
        client.last_error = legacy.restore(meta.get("last_error"))
        if not gate.restore_login(client, meta.get("login"), self.relay.gate):
            log.warning("dropping a handed-over client of %s: its user is gone",
                        meta.get("login"))
            client.close()
            return
        self._register(client)
        if client.closed:
            return
        parked = meta.get("parked")
        if parked:
            client.take()
            self.dispatcher.submit_parked(client, self.relay.parked_now(
                parked["frame"], parked["command"], parked["exhaust"]))
            return
        self._advance(client, unread=True)

    def _shutdown(self) -> None:
        for client in list(self._clients):
            client.busy = False         # the workers are stopped (or cut off) by now
            self._close(client, "shutdown")
        for listener in list(self._listeners.values()):
            self._unregister(listener.sock)
            listener.sock.close()
        self._listeners.clear()
        self._selector.close()
        with self._wake_lock:
            os.close(self._wake_fd)
            self._wake_fd = None


def _guarded(fn: Callable[[], Any], what: str) -> None:
    """Run fn; an error is logged, never raised into the acceptor's loop."""
    try:
        fn()
    except Exception:
        log.exception("%s failed", what)
