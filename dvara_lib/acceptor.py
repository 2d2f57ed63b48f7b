"""The acceptor thread: the only owner of the selector, the listeners and idle clients.

# design:
# The acceptor thread owns the selector and every idle or parked client socket. It reads
# what clients send with non-blocking reads and assembles whole frames; only a complete
# message is handed to the ThreadPoolExecutor, so thousands of idle clients cost no
# thread. While a worker relays a message the client's socket is out of the selector;
# the worker hands the client back through ``handback`` (a SimpleQueue plus a wake-up
# pipe) and only this thread registers it again. Awaitable hellos are parked here, with
# no worker and no server connection, until their member changes or their time is up.
# A client holding a pinned server connection (after a write that has no reply) needs no
# checkout, so its messages go to a few workers of their own: clients waiting for the
# pool can then never hold up the getLastError that gives a connection back.
# Workers and other threads never touch the selector: they call ``call_soon``.
"""

from __future__ import annotations

import base64
import collections
import errno
import heapq
import itertools
import logging
import os
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import auth, handoff, hello, legacy, tls, wire
from dvara_lib.client import ClientConn
from dvara_lib.discovery import start_thread_pool
from dvara_lib.errors import ProtocolError
from dvara_lib.relay import CLOSE, PARK, Relay

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.topology import Member

log = logging.getLogger("dvara.acceptor")

_HOUSEKEEPING_INTERVAL = 0.5
_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF = 0.1


class _Listener:
    __slots__ = ("sock", "member")

    def __init__(self, sock: socket.socket, member: "Member") -> None:
        self.sock = sock
        self.member = member


class Acceptor(threading.Thread):
    """Accepts clients, reads their messages, hands whole messages to the executor.

    Methods for other threads: add_listener, retire, handback, topology_changed, drain,
    adopt, stop, call_soon (and, reading snapshots, listener_fds, counts,
    clients_per_member). Everything else runs in this thread only.
    """

    def __init__(self, settings: "Settings", executor: Executor, relay: Relay) -> None:
        super().__init__(name="dvara-acceptor", daemon=True)
        self.settings = settings
        self.executor = executor
        # As many as one member's pins can need (each pin holds one of its connections).
        self._pinned_executor = start_thread_pool(
            max(2, min(settings.workers, settings.max_connections)), "dvara-pinned")
        self.relay = relay
        self.tls = tls.ClientTLS.from_settings(settings)   # issue 7: client TLS, or None
        self._selector = selectors.DefaultSelector()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listeners: dict["Member", _Listener] = {}
        self._clients: set[ClientConn] = set()      # every open client
        self._busy: set[ClientConn] = set()         # clients a worker holds
        # issue 6: each member's share of the workers (see _submit_shared)
        self._in_flight: collections.Counter["Member"] = collections.Counter()
        self._counted: dict[ClientConn, "Member"] = {}
        self._held: dict["Member", collections.deque[tuple[ClientConn, bytes]]] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._deadlines: list[tuple[float, int, ClientConn]] = []
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._running = True
        self._draining = False
        self._accept_error_logged = 0.0
        self._sender: Optional[handoff.Sender] = None
        self.drained = threading.Event()
        self._next_housekeeping = 0.0

    # -- API for other threads ------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn in the acceptor thread."""
        self._calls.put(fn)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full, so a wake-up is pending already

    def add_listener(self, sock: socket.socket, member: "Member") -> None:
        sock.setblocking(False)
        self.call_soon(lambda: self._add_listener(sock, member))

    def handback(self, client: ClientConn, verdict: str) -> None:
        """Called by a worker when it is done with client."""
        self.call_soon(lambda: self._resume(client, verdict))

    def retire(self, member: "Member") -> None:
        """Close member's listener; its clients finish their message in flight, then close."""
        self.call_soon(lambda: self._retire(member))

    def topology_changed(self, member: "Member") -> None:
        self.call_soon(lambda: self._answer_parked(member))

    def drain(self, sender: Optional[handoff.Sender] = None) -> None:
        """Stop accepting; between two messages, close each client (or, with a sender,
        move it to the process that replaces this one); set ``drained`` when none is left.
        """
        self.call_soon(lambda: self._begin_drain(sender))

    def adopt(self, sock: socket.socket, meta: dict[str, Any], member: "Member") -> None:
        """Take over a client handed over by the process this one replaces."""
        self.call_soon(lambda: self._adopt(sock, meta, member))

    def stop(self) -> None:
        self._running = False
        self.call_soon(lambda: None)

    def listener_fds(self) -> dict[int, int]:
        """proxy port → listening socket fd, for the process that will replace this one."""
        return {member.proxy_port: listener.sock.fileno()
                for member, listener in list(self._listeners.items())}

    def counts(self) -> dict[str, int]:
        return {"clients": len(self._clients), "busy": len(self._busy)}

    def clients_per_member(self) -> dict[str, int]:
        """Open clients per real member address (read without a lock: a snapshot)."""
        return dict(collections.Counter(c.member.real for c in list(self._clients)))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self._running:
                for key, _ in self._selector.select(self._timeout()):
                    self._dispatch_event(key)
                self._housekeeping()
        except Exception:
            log.exception("acceptor failed")
            raise
        finally:
            self._shutdown()

    def _timeout(self) -> float:
        now = time.monotonic()
        when = self._next_housekeeping
        if self._deadlines:
            when = min(when, self._deadlines[0][0])
        if self._timers:
            when = min(when, self._timers[0][0])
        return max(0.0, min(when - now, _HOUSEKEEPING_INTERVAL))

    def _dispatch_event(self, key: selectors.SelectorKey) -> None:
        data = key.data
        if data is None:
            self._run_calls()
        elif isinstance(data, _Listener):
            self._accept(data)
        else:
            self._on_readable(data)

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:
                log.exception("acceptor callback failed")

    # -- listeners and accepting ------------------------------------------------------------
    def _add_listener(self, sock: socket.socket, member: "Member") -> None:
        listener = _Listener(sock, member)
        self._listeners[member] = listener
        if not self._draining:
            self._selector.register(sock, selectors.EVENT_READ, listener)

    def _remove_listener(self, member: "Member") -> None:
        listener = self._listeners.pop(member, None)
        if listener is not None:
            self._unregister(listener.sock)
            listener.sock.close()

    def _retire(self, member: "Member") -> None:
        self._remove_listener(member)
        for client in [c for c in self._clients if c.member is member]:
            client.closing = True
            if client not in self._busy:
                self._close(client, "member left the replica set")

    def _accept(self, listener: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(listener, exc)
                return
            self._admit(sock, peer, listener.member)

    def _accept_failed(self, listener: _Listener, exc: OSError) -> None:
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
            return
        now = time.monotonic()
        if now - self._accept_error_logged >= 1.0:   # at most one line a second
            self._accept_error_logged = now
            log.error("accept on %s failed: %s; retrying every %.1fs", listener.member.proxy,
                      exc, _ACCEPT_BACKOFF)
        self._unregister(listener.sock)
        self._later(_ACCEPT_BACKOFF, lambda: self._reregister_listener(listener))

    def _reregister_listener(self, listener: _Listener) -> None:
        if self._listeners.get(listener.member) is listener and not self._draining:
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
        client = ClientConn(sock, peer, member, self.settings.message_timeout)
        self._clients.add(client)
        self._per_ip[ip] += 1
        member.stats.incr("clients.connects")
        member.stats.gauge_add("clients.connected", 1)
        if self.tls is not None:                # issue 7: TLS handshake, run by client.fill()
            self.tls.admit(client)
            self._later(self.tls.handshake_timeout, lambda: self.tls.handshaking(client)
                        and self._close(client, "no TLS handshake in time"))
        self._selector.register(sock, selectors.EVENT_READ, client)
        log.debug("accepted %s", client)

    # -- clients ----------------------------------------------------------------------------
    def _on_readable(self, client: ClientConn) -> None:
        if not client.fill():
            self._close(client, "disconnected")
            return
        if client.parked is None:
            self._submit_if_ready(client)

    def _submit_if_ready(self, client: ClientConn) -> None:
        try:
            frame = client.next_frame()
        except ProtocolError as exc:
            client.member.stats.incr("errors.bad_frame")
            log.warning("closing %s: %s", client, exc)
            self._close(client, "bad frame")
            return
        if frame is None:
            return
        self._unregister(client.sock)
        self._busy.add(client)
        if client.pinned is not None:
            self._pinned_executor.submit(self.relay.serve, client, frame)
        else:
            self._submit_shared(client, frame)

    # -- issue 6: each member's share of the workers ------------------------------------
    # A hung member holds every worker relaying to it for up to --message-timeout. So that
    # it never holds them all (hellos and other members' clients would wait behind it),
    # one member's messages use at most _member_share() workers at a time; the others
    # wait here, in order, with no worker. Hellos (the proxy answers them) never wait.
    def _submit_shared(self, client: ClientConn, frame: bytes) -> None:
        member = client.member
        if self._in_flight[member] >= self._member_share():
            if not _answered_by_proxy(frame):
                self._held.setdefault(member, collections.deque()).append((client, frame))
                return
        else:
            self._in_flight[member] += 1
            self._counted[client] = member
        self.executor.submit(self.relay.serve, client, frame)

    def _member_share(self) -> int:
        workers = self.settings.workers
        return max(1, workers - max(1, workers // 4))

    def _release_share(self, client: ClientConn) -> None:
        """client's message is done: its member's next held message gets the worker."""
        member = self._counted.pop(client, None)
        if member is None:
            return
        self._in_flight[member] -= 1
        held = self._held.get(member)
        while held:
            waiting, frame = held.popleft()
            if waiting in self._clients:
                self._in_flight[member] += 1
                self._counted[waiting] = member
                self.executor.submit(self.relay.serve, waiting, frame)
                break
        if not held:
            self._held.pop(member, None)
            if not self._in_flight[member]:
                del self._in_flight[member]

    def _resume(self, client: ClientConn, verdict: str) -> None:
        """A worker is done with client: close it, park it, or read its next message."""
        self._busy.discard(client)
        self._release_share(client)
        if verdict == CLOSE or client.closed or client.closing:
            self._close(client, "closed by proxy" if verdict == CLOSE else "closing")
        else:
            self._selector.register(client.sock, selectors.EVENT_READ, client)
            if verdict == PARK:
                client.member.stats.gauge_add("hello.parked", 1)
                heapq.heappush(self._deadlines,
                               (client.parked.deadline, next(self._seq), client))
            else:
                self._submit_if_ready(client)
        self._check_drained()

    def _answer_parked(self, member: Optional["Member"], now: float = 0.0) -> None:
        """Answer parked hellos of member whose answer changed (all members if None)."""
        for client in [c for c in self._clients if c.parked is not None]:
            if member is not None and client.member is not member:
                continue
            if member is not None and client.parked.counter == member.counter:
                continue
            self._unpark(client)

    def _unpark(self, client: ClientConn) -> None:
        parked = client.parked
        client.parked = None
        client.member.stats.gauge_add("hello.parked", -1)
        self._unregister(client.sock)
        self._busy.add(client)
        self.executor.submit(self.relay.serve_parked, client, parked)

    def _close(self, client: ClientConn, why: str) -> None:
        if client not in self._clients:
            return
        self._clients.discard(client)
        self._busy.discard(client)
        self._per_ip[client.peer_ip] -= 1
        if self._per_ip[client.peer_ip] <= 0:
            del self._per_ip[client.peer_ip]
        if client.parked is not None:
            client.parked = None
            client.member.stats.gauge_add("hello.parked", -1)
        if client.pinned is not None:
            self.relay.release_pin(client, reusable=not client.buf)
        self._unregister(client.sock)
        client.close()
        stats = client.member.stats
        stats.incr("clients.disconnects")
        stats.gauge_add("clients.connected", -1)
        log.debug("closed %s: %s", client, why)
        self._check_drained()

    def _unregister(self, sock: socket.socket) -> None:
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
            heapq.heappop(self._timers)[2]()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, client = heapq.heappop(self._deadlines)
            if client.parked is not None and client.parked.deadline <= now \
                    and client in self._clients and client not in self._busy:
                self._unpark(client)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_INTERVAL
            self._expire_idle(now)

    def _expire_idle(self, now: float) -> None:
        idle_cutoff = now - self.settings.client_idle_timeout
        for client in list(self._clients):
            if client in self._busy:
                continue
            if client.pinned is not None and client.pin_deadline <= now:
                client.member.stats.incr("gle.pin_timeouts")
                self.relay.release_pin(client, reusable=True)
            if client.parked is None and client.last_active < idle_cutoff:
                client.member.stats.incr("clients.idle_timeouts")
                self._close(client, "idle timeout")

    # -- draining and shutdown --------------------------------------------------------------
    def _begin_drain(self, sender: Optional[handoff.Sender]) -> None:
        self._draining = True
        self._sender = sender
        for member in list(self._listeners):
            self._remove_listener(member)
        self._check_drained()

    def _check_drained(self) -> None:
        """While draining: let go of every client that is between two messages."""
        if not self._draining:
            return
        for client in list(self._clients):
            if client in self._clients and client not in self._busy and client.pinned is None:
                self._let_go(client)
        if not self._clients:
            self.drained.set()

    def _let_go(self, client: ClientConn) -> None:
        """Move client to the new process if there is one and it can move, else close it."""
        sender, parked = self._sender, client.parked
        login = auth.login_of(client)
        if sender is None or len(client.buf) > handoff.MAX_BUFFERED or client.closing \
                or client.reader is not None or login is False:
            # A TLS session, or a login half done, lives in this process only.
            self._close(client, "draining")
            return
        parked_meta = None if parked is None else {
            "frame": base64.b64encode(parked.frame).decode(), "command": parked.command,
            "exhaust": parked.exhaust}
        meta = handoff.describe(client.member.real, client.peer, bytes(client.buf),
                                client.compressors, parked_meta, login=login,
                                last_error=legacy.describe(client.last_error))
        self._unregister(client.sock)
        moved = sender.send_client(client.sock, meta)
        self._close(client, "handed to the new process" if moved else "draining")

    def _adopt(self, sock: socket.socket, meta: dict[str, Any], member: "Member") -> None:
        sock.setblocking(False)
        client = ClientConn(sock, tuple(meta["peer"]), member, self.settings.message_timeout)
        client.buf += meta["buf"]
        client.compressors = list(meta.get("compressors") or [])
        client.last_error = legacy.restore(meta.get("last_error"))
        if not auth.restore_login(client, meta.get("login"), self.relay.gate):
            log.warning("dropping a handed-over client of %s: its user is gone",
                        meta.get("login"))
            sock.close()
            return
        self._clients.add(client)
        self._per_ip[client.peer_ip] += 1
        member.stats.incr("clients.connects")
        member.stats.gauge_add("clients.connected", 1)
        parked = meta.get("parked")
        if parked:
            frame = base64.b64decode(parked["frame"])
            self._busy.add(client)
            self.executor.submit(self.relay.serve_parked, client,
                                 self.relay.parked_now(frame, parked["command"],
                                                       parked["exhaust"]))
            return
        self._selector.register(sock, selectors.EVENT_READ, client)
        self._submit_if_ready(client)

    def _shutdown(self) -> None:
        for client in list(self._clients):
            if client not in self._busy:
                self._close(client, "shutdown")
        for listener in list(self._listeners.values()):
            self._unregister(listener.sock)
            listener.sock.close()
        self._listeners.clear()
        self._selector.close()
        self._pinned_executor.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _answered_by_proxy(frame: bytes) -> bool:
    """A hello or isMaster: the relay answers it itself, without the member."""
    try:
        return wire.opcode(frame) != wire.OP_COMPRESSED and hello.is_hello(
            wire.command_name(frame))
    except ProtocolError:
        return False
