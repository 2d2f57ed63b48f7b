"""A bounded, thread-safe pool of server connections to one replica-set member.

# design:
# Connections are kept in a LIFO deque guarded by one lock (a Condition on it is waited
# on only when the pool is full); nothing holds the lock across socket I/O (connecting and the handshake happen after a slot is reserved and the
# lock released). A generation counter makes ``clear()`` cheap: it closes the idle
# connections now, and a checked-out connection of an older generation is closed when it
# comes back. A connection that may hold unread bytes is checked in with
# ``reusable=False`` and is closed, never reused.

Methods for callers:

- checkout(timeout) -> ServerConnection   (Can raise PoolTimeout or ConnectionFailure.)
  The connection is a context manager: ``with pool.checkout(t) as conn:`` checks it back
  in when the block ends, not reusable if the block raised or ``conn.spoil()`` was called,
  unless it was pinned to a client meanwhile (``conn.pinned``): the pin's owner then
  checks it in (``checkin``) or uses it again in a ``with conn:`` block.
- checkout_idle() -> Optional[ServerConnection], checkin_idle(conn, now): the usual
  checkout and checkin, without waiting and without recording anything (the relay's
  fast path records them itself)
- checkin(conn, reusable)
- clear()       after a network error: retire every connection opened so far
- maintain()    close connections idle too long, open up to min_idle (discovery thread)
- close()
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import socket
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Union

from dvara_lib import wire
from dvara_lib.errors import ConnectionFailure, PoolTimeout, ProtocolError

log = logging.getLogger("dvara.pool")


class Compressed(NamedTuple):
    """A socket whose handshake agreed on a compressor (--backend-compressors)."""

    sock: socket.socket
    compressor: int


#: Opens a socket to a member and runs the proxy's own handshake on it.
Connector = Callable[[], Union[socket.socket, Compressed]]
_OP_COMPRESSED_BYTES = wire.INT32.pack(wire.OP_COMPRESSED)


class ServerConnection:
    """One socket to a server, owned by the pool or by exactly one worker at a time."""

    __slots__ = ("sock", "generation", "id", "created", "last_checkin", "checked_out_at",
                 "closed", "pool", "spoiled", "pinned", "rest", "user")

    def __init__(self, sock: socket.socket, generation: int,
                 pool: Optional["Pool"] = None, conn_id: int = 0) -> None:
        self.sock = sock
        self.generation = generation
        self.pool = pool
        self.id = conn_id        # unique within its pool, for logs
        self.created = self.last_checkin = self.checked_out_at = time.monotonic()
        self.closed = False
        self.spoiled = False    # may hold unread bytes or failed: never reused
        self.pinned = False     # handed to a client's pin: the pin checks it in
        self.rest = b""         # bytes read past the last message (an exhaust stream's next)
        self.user: Any = None   # logged in as (--auth-passthrough: dvara_lib.backend.userpool)

    def __enter__(self) -> "ServerConnection":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.pinned:
            self.pool.checkin(self, reusable=exc_type is None and not self.spoiled)

    def spoil(self) -> None:
        """Never reuse this connection (it failed, or may hold unread bytes)."""
        self.spoiled = True

    def send(self, data: bytes) -> None:
        """Write one message. Can raise ConnectionFailure or ServerTimeout.
        (wire.send_all's steps, inline: this runs once per relayed message.)"""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise wire.write_error(exc) from exc

    def read_frame(self) -> bytes:
        """Read one message, in one recv when it is small (the usual reply).

        Can raise ConnectionFailure, ServerTimeout or ProtocolError.
        """
        if not self.rest:
            try:                        # wire.recv_some's steps, inline (once per reply)
                data = self.sock.recv(wire.READ_CHUNK)
            except OSError as exc:
                raise wire.read_error(exc) from exc
            if len(data) >= 16 and wire.INT32.unpack_from(data, 0)[0] == len(data):
                return data             # the usual reply: whole in one read
            if not data:
                raise ConnectionFailure("connection closed by server")
        else:
            data, self.rest = self.rest, b""
        while len(data) < 16:
            data += wire.recv_some(self.sock, wire.READ_CHUNK)
        length = wire.INT32.unpack_from(data, 0)[0]
        wire.check_length(length)
        if len(data) < length:
            return data + wire.recv_exact(self.sock, length - len(data))
        if len(data) > length:
            data, self.rest = data[:length], data[length:]
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()

    def __repr__(self) -> str:
        return f"<ServerConnection #{self.id} gen {self.generation}>"


class CompressedConnection(ServerConnection):
    """A server connection that compresses what it sends with the compressor its
    handshake agreed on, and decompresses what it reads, so that its users see plain
    frames only. (A connection without compression is a plain ServerConnection: the
    usual case pays nothing for this.)"""

    __slots__ = ("compressor",)

    def __init__(self, sock: socket.socket, generation: int, compressor: int,
                 pool: Optional["Pool"] = None, conn_id: int = 0) -> None:
        super().__init__(sock, generation, pool, conn_id)
        self.compressor = compressor

    def send(self, data: bytes) -> None:
        """Write one (plain) message compressed, unless the OP_COMPRESSED spec says that
        command must travel plain. Can raise ConnectionFailure or ServerTimeout."""
        try:
            plain = wire.command_name(data) in wire.UNCOMPRESSED_COMMANDS
        except ProtocolError:
            plain = False
        wire.send_all(self.sock, data if plain else wire.compress(data, self.compressor))

    def read_frame(self) -> bytes:
        """Read one message, decompressed. Can raise ConnectionFailure, ServerTimeout or
        ProtocolError."""
        frame = super().read_frame()
        if frame[12:16] == _OP_COMPRESSED_BYTES:
            frame = wire.decompress(frame)[0]
        return frame


def new_connection(opened: Union[socket.socket, Compressed], generation: int,
                   pool: Optional["Pool"] = None, conn_id: int = 0) -> ServerConnection:
    """The connection for what a Connector opened: compressed if its handshake said so."""
    if isinstance(opened, Compressed):
        return CompressedConnection(opened.sock, generation, opened.compressor, pool, conn_id)
    return ServerConnection(opened, generation, pool, conn_id)


class PoolStats:
    """Hooks the pool calls; the metrics module overrides them."""

    def created(self) -> None: ...
    def closed(self) -> None: ...
    def checkout_wait(self, seconds: float) -> None: ...
    def checkout_timeout(self) -> None: ...
    def held(self, seconds: float) -> None: ...


class Pool:
    """At most ``max_size`` connections to one member, handed out one request at a time."""

    def __init__(self, name: str, connector: Connector, max_size: int, min_idle: int = 0,
                 idle_timeout: float = 3600.0, stats: Optional[PoolStats] = None) -> None:
        self.name = name
        self._connector = connector
        self.max_size = max_size
        self.min_idle = min_idle
        self.idle_timeout = idle_timeout
        self.stats = stats or PoolStats()
        self._idle: collections.deque[ServerConnection] = collections.deque()
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()
        self._total = 0          # idle + checked out + being opened
        self._waiting = 0
        self._lent: set[ServerConnection] = set()   # checked out now
        self.generation = 0
        self._closed = False
        self._ids = itertools.count(1)

    # -- numbers for status and metrics ---------------------------------------------
    @property
    def open_count(self) -> int:
        return self._total

    @property
    def in_use(self) -> int:
        return self._total - len(self._idle)

    @property
    def waiting(self) -> int:
        return self._waiting

    # -- checkout / checkin -----------------------------------------------------------
    def checkout(self, timeout: float) -> ServerConnection:
        """A connection for one request. Can raise PoolTimeout or ConnectionFailure."""
        start = time.monotonic()
        with self._lock:
            if self._idle and not self._closed:     # the usual case: no wait, no connect
                conn: Optional[ServerConnection] = self._idle.pop()
                self._lent.add(conn)
            else:
                conn = self._take_or_reserve(start + timeout)
        if conn is None:
            conn = self._open_reserved()
        try:
            conn.checked_out_at = now = time.monotonic()
            conn.spoiled = conn.pinned = False
            self.stats.checkout_wait(now - start)
        except BaseException:
            self.checkin(conn, reusable=False, count_held=False)
            raise
        return conn

    def _take_or_reserve(self, deadline: float) -> Optional[ServerConnection]:
        """Under the lock: an idle connection, or None after reserving a slot to open one."""
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise ConnectionFailure(f"pool for {self.name} is closed")
                if self._idle:
                    conn = self._idle.pop()
                    self._lent.add(conn)
                    return conn
                if self._total < self.max_size:
                    self._total += 1
                    return None
                self._wait_or_time_out(deadline)
        finally:
            self._waiting -= 1

    def _wait_or_time_out(self, deadline: float) -> None:
        """Under the lock: wait for a checkin (or change) until deadline; raise
        PoolTimeout once it passed with the pool still full."""
        remaining = deadline - time.monotonic()
        if (remaining <= 0 or not self._wait(remaining)) and self._still_full():
            self.stats.checkout_timeout()
            raise PoolTimeout(f"timed out waiting for a connection to {self.name} "
                              f"({self.max_size} in use)")

    def _still_full(self) -> bool:
        """Under the lock, after a wait timed out: no room came just then."""
        return not self._idle and self._total >= self.max_size

    def _wait(self, timeout: float) -> bool:
        """Under the lock: let it go until a checkin (or change) wakes this thread, or
        timeout passes; True if woken. Like Condition.wait, without its Python layers."""
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        try:
            woken = waiter.acquire(timeout=timeout)
        finally:
            self._lock.acquire()
        if not woken:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                woken = True            # woken just as the wait timed out
        return woken

    def _notify(self, all_waiters: bool = False) -> None:
        """Under the lock: wake the longest waiting thread (or all of them)."""
        while self._waiters:
            self._waiters.popleft().release()
            if not all_waiters:
                return

    def _open_reserved(self) -> ServerConnection:
        generation = self.generation
        try:
            opened = self._connector()
        except BaseException:
            with self._lock:
                self._total -= 1
                self._notify()
            raise
        conn = new_connection(opened, generation, self, next(self._ids))
        with self._lock:
            self._lent.add(conn)
        self.stats.created()
        log.debug("opened a connection to %s", self.name)
        return conn

    def checkout_idle(self) -> Optional[ServerConnection]:
        """The usual checkout, for the relay's fast path: the idle connection used last,
        or None (then checkout). It records nothing: the caller reports the wait (none)
        and the time held (MemberMetrics.relayed), and gives it back with checkin_idle.
        (No "with" and no try around these few steps, which cannot fail: each costs
        method lookups, once per message.)"""
        lock = self._lock
        lock.acquire()
        if not self._idle or self._closed:
            lock.release()
            return None
        conn = self._idle.pop()
        self._lent.add(conn)
        lock.release()
        conn.spoiled = conn.pinned = False
        return conn

    def checkin_idle(self, conn: ServerConnection, now: float) -> None:
        """The usual checkin, for the relay's fast path (after checkout_idle; now is
        time.monotonic()): conn is sound, and nothing is recorded. Anything unusual
        (a stale connection, a closed pool, threads waiting) goes through checkin."""
        lock = self._lock
        lock.acquire()
        if conn.generation != self.generation or self._closed or self._waiters:
            lock.release()
            self.checkin(conn, True, False)
            return
        self._lent.discard(conn)
        conn.last_checkin = now
        self._idle.append(conn)
        lock.release()

    def checkin(self, conn: ServerConnection, reusable: bool = True,
                count_held: bool = True) -> None:
        """Give conn back; it is closed if not reusable, stale, or the pool is closed."""
        now = time.monotonic()
        lock = self._lock
        lock.acquire()
        try:
            self._lent.discard(conn)
            keep = reusable and not conn.closed and not self._closed \
                and conn.generation == self.generation
            if keep:
                conn.last_checkin = now
                self._idle.append(conn)
            else:
                self._forget_conn(conn)
            if self._waiters:
                self._notify()
        finally:
            lock.release()
        try:
            if count_held:
                self.stats.held(now - conn.checked_out_at)
        finally:
            if not keep:
                self._discard(conn)

    def _forget_conn(self, conn: ServerConnection) -> None:
        """Under the lock: conn (checked in, not kept) no longer counts."""
        self._total -= 1

    def _discard(self, conn: ServerConnection) -> None:
        conn.close()
        self.stats.closed()

    # -- maintenance ------------------------------------------------------------------
    def resize(self, max_size: int, min_idle: int, idle_timeout: float) -> None:
        """New limits (SIGHUP); waiters re-check at once."""
        with self._lock:
            self.max_size, self.min_idle, self.idle_timeout = max_size, min_idle, idle_timeout
            self._notify(all_waiters=True)

    def clear(self) -> None:
        """Retire every connection opened so far (after a network error)."""
        with self._lock:
            self.generation += 1
            stale = self._take_idle()
        for conn in stale:
            self._discard(conn)
        if stale:
            log.info("cleared %d idle connection(s) to %s", len(stale), self.name)

    def maintain(self) -> None:
        """Close connections idle too long; open connections up to min_idle."""
        cutoff = time.monotonic() - self.idle_timeout
        with self._lock:
            removable = max(len(self._idle) - self.min_idle, 0)
            expired = [c for c in self._idle if c.last_checkin < cutoff][:removable]
            for conn in expired:
                self._idle.remove(conn)
            self._total -= len(expired)
        for conn in expired:
            self._discard(conn)
        for _ in range(self.min_idle):
            if not self._reserve_for_min_idle():
                return
            try:
                conn = self._open_reserved()
            except Exception as exc:
                log.warning("could not pre-open a connection to %s: %s", self.name, exc)
                return
            self.checkin(conn, reusable=True, count_held=False)

    def _reserve_for_min_idle(self) -> bool:
        with self._lock:
            if self._closed or len(self._idle) >= self.min_idle or self._total >= self.max_size:
                return False
            self._total += 1
            return True

    def abort(self) -> None:
        """Close the pool and cut every connection in use, so that a worker blocked on
        one fails now (the last step of a shutdown whose drain timed out)."""
        self.close()
        with self._lock:
            lent = list(self._lent)
        for conn in lent:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stale = self._take_idle()
        for conn in stale:
            self._discard(conn)

    def _take_idle(self) -> list[ServerConnection]:
        """Take every idle connection out of the pool and wake the waiters (they re-check
        the pool); the caller holds the lock, and closes what it took after releasing it."""
        stale = list(self._idle)
        self._idle.clear()
        self._total -= len(stale)
        self._notify(all_waiters=True)
        return stale
