"""A member's pool whose connections are logged in per user (--auth-passthrough).

# design:
# With SCRAM pass-through every server connection is logged in as the client's own user
# (or not at all, for the few commands a client may run before its login). The member's
# ``UserPool`` stays the bound of --max-connections in total, and every connection
# carries the user it is logged in as (``conn.user``: a (db, name) key, None for none).
# A checkout for user U takes U's most recent idle connection (LIFO); else opens one for
# U while under the bound (and under --max-user-connections for U); else closes the
# least recently used idle connection of another user to make room; else waits, up to
# the timeout. Waiters are all woken on a change (a freed slot may serve any user).
# Checking in is ``Pool.checkin``: the idle list it appends to files the connection under
# its user. The generation counter retires connections as in ``Pool``; ``clear_user`` retires
# one user's idle connections (its server login failed: its password changed). The
# opening and the login happen outside the lock, as in ``Pool``. The single-account
# mode never builds a UserPool: its hot path is ``Pool``'s, untouched.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from typing import Any, Callable, Optional, Union

from dvara_lib.backend.pool import Compressed, Pool, PoolStats, ServerConnection, new_connection
from dvara_lib.errors import ConnectionFailure

log = logging.getLogger("dvara.pool")

#: (db, name) of a user, or None for a connection that is not logged in.
UserKey = Optional[tuple[str, str]]
#: Opens a socket to the member and logs it in for a user (the login object given).
UserConnector = Callable[[Any], Union[socket.socket, Compressed]]


def _unusable() -> Any:
    raise ConnectionFailure("a pass-through pool opens connections per user only")


class UserPool(Pool):
    """At most ``max_size`` connections to one member, each logged in as one user."""

    def __init__(self, name: str, connector: UserConnector, max_size: int,
                 max_per_user: int = 0, idle_timeout: float = 3600.0,
                 stats: Optional[PoolStats] = None) -> None:
        super().__init__(name, _unusable, max_size, 0, idle_timeout, stats)
        self._user_connector = connector
        self.max_per_user = max_per_user          # 0: no cap but max_size
        idle = _IdleByUser()
        self._idle = idle                         # type: ignore[assignment]
        self._by_user = idle.by_user
        self._per_user: dict[UserKey, int] = {}  # open (idle, lent, being opened)

    # -- numbers for status ------------------------------------------------------------
    def users(self) -> dict[str, dict[str, int]]:
        """Per user ("db.name", "-" for none): connections open and in use."""
        with self._lock:
            return {("-" if key is None else f"{key[0]}.{key[1]}"):
                    {"open": n, "in_use": n - len(self._by_user.get(key, ()))}
                    for key, n in sorted(self._per_user.items(), key=lambda kv: str(kv[0]))}

    # -- checkout / checkin ------------------------------------------------------------
    def checkout(self, timeout: float) -> ServerConnection:
        """Not logged in as anyone (the commands a client may run before its login).
        Can raise PoolTimeout or ConnectionFailure."""
        return self.checkout_as(None, None, timeout)

    def checkout_idle(self) -> Optional[ServerConnection]:
        """None: every connection is taken for its user (checkout_as)."""
        return None

    def checkout_as(self, key: UserKey, login: Any, timeout: float) -> ServerConnection:
        """A connection logged in as key (with login when one must be opened). Can raise
        PoolTimeout, ConnectionFailure (AuthenticationFailure: the login was refused)."""
        start = time.monotonic()
        with self._lock:
            conn, evicted = self._take_or_reserve_as(key, start + timeout)
        if evicted is not None:
            self._discard(evicted)
        if conn is None:
            conn = self._open_as(key, login)
        conn.checked_out_at = now = time.monotonic()
        conn.spoiled = conn.pinned = False
        self.stats.checkout_wait(now - start)
        return conn

    def _take_or_reserve_as(self, key: UserKey, deadline: float
                            ) -> tuple[Optional[ServerConnection], Optional[ServerConnection]]:
        """Under the lock: (an idle connection of key, None), or (None, a connection of
        another user to close) after reserving a slot for key."""
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise ConnectionFailure(f"pool for {self.name} is closed")
                idle = self._by_user.get(key)
                if idle:
                    conn = idle.pop()
                    self._lent.add(conn)
                    return conn, None
                if not self.max_per_user or self._per_user.get(key, 0) < self.max_per_user:
                    if self._total < self.max_size:
                        self._reserve(key)
                        return None, None
                    victim = self._evictable()
                    if victim is not None:
                        self._forget(victim.user)
                        self._reserve(key)
                        return None, victim
                self._wait_or_time_out(deadline)
        finally:
            self._waiting -= 1

    def _still_full(self) -> bool:
        """After a wait timed out: the time is up (a slot freed just then wakes the other
        waiters, who check it for their own user)."""
        return True

    def _reserve(self, key: UserKey) -> None:
        self._total += 1
        self._per_user[key] = self._per_user.get(key, 0) + 1

    def _forget(self, key: UserKey) -> None:
        """Under the lock: one connection of key (idle, lent or being opened) no longer
        counts."""
        self._total -= 1
        left = self._per_user.get(key, 1) - 1
        if left > 0:
            self._per_user[key] = left
        else:
            self._per_user.pop(key, None)
            self._by_user.pop(key, None)

    def _evictable(self) -> Optional[ServerConnection]:
        """Under the lock: the least recently used idle connection of any user, taken
        out of its idle list."""
        oldest: Optional[collections.deque[ServerConnection]] = None
        for idle in self._by_user.values():
            if idle and (oldest is None or idle[0].last_checkin < oldest[0].last_checkin):
                oldest = idle
        return oldest.popleft() if oldest is not None else None

    def _open_as(self, key: UserKey, login: Any) -> ServerConnection:
        generation = self.generation
        try:
            opened = self._user_connector(login)
        except BaseException:
            with self._lock:
                self._forget(key)
                self._notify(all_waiters=True)
            raise
        conn = new_connection(opened, generation, self, next(self._ids))
        conn.user = key
        with self._lock:
            self._lent.add(conn)
        self.stats.created()
        log.debug("opened a connection to %s for %s", self.name, _who(key))
        return conn

    def _forget_conn(self, conn: ServerConnection) -> None:
        """Under the lock (Pool.checkin): conn, not kept, no longer counts."""
        self._forget(conn.user)

    def _notify(self, all_waiters: bool = False) -> None:
        """Under the lock: wake every waiter (a freed slot may serve any user)."""
        super()._notify(all_waiters=True)

    # -- maintenance -------------------------------------------------------------------
    def clear_user(self, key: UserKey) -> None:
        """Close key's idle connections, and retire the ones in use (its login failed)."""
        with self._lock:
            idle = self._by_user.get(key)
            stale = list(idle or ())
            if idle:
                idle.clear()
            for conn in stale:
                self._forget(key)
            for conn in self._lent:
                if conn.user == key:
                    conn.generation = -1          # closed when it comes back
            self._notify(all_waiters=True)
        for conn in stale:
            self._discard(conn)
        if stale:
            log.info("cleared %d idle connection(s) to %s of %s", len(stale), self.name,
                     _who(key))

    def maintain(self) -> None:
        """Close connections idle too long (no pre-opened connections: they have no user)."""
        cutoff = time.monotonic() - self.idle_timeout
        with self._lock:
            expired = [c for idle in self._by_user.values() for c in idle
                       if c.last_checkin < cutoff]
            for conn in expired:
                self._by_user[conn.user].remove(conn)
            for conn in expired:
                self._forget(conn.user)
        for conn in expired:
            self._discard(conn)

    def _take_idle(self) -> list[ServerConnection]:
        """Under the lock: every idle connection, out of the pool; the waiters woken."""
        stale = [c for idle in self._by_user.values() for c in idle]
        for idle in self._by_user.values():
            idle.clear()
        for conn in stale:
            self._forget(conn.user)
        self._notify(all_waiters=True)
        return stale


class _IdleByUser:
    """The idle connections of a UserPool, LIFO per user: what Pool.checkin appends to
    (conn.user says where) and Pool.in_use counts."""

    def __init__(self) -> None:
        self.by_user: dict[UserKey, collections.deque[ServerConnection]] = {}

    def append(self, conn: ServerConnection) -> None:
        self.by_user.setdefault(conn.user, collections.deque()).append(conn)

    def __len__(self) -> int:
        return sum(len(idle) for idle in self.by_user.values())


def _who(key: UserKey) -> str:
    return "no user" if key is None else f"{key[0]}.{key[1]}"
