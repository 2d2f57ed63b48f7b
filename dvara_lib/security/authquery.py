"""--auth-query: users' SCRAM verifiers fetched from the servers, cached with a time-out.

# design:
# When a client logs in as a user the --client-auth-file does not hold, the gate asks a
# ``VerifierCache``; on a miss or an expired entry the cache runs the fetch it is given
# (``usersInfo`` with ``showCredentials: true`` on the proxy's own account, on a
# short-lived server connection: dvara_lib.backend.connect) in the calling worker
# thread, with no lock held across that round trip. An unknown user is cached too (as
# None), so that guessed names cost one lookup per time-out. When a refetch finds a
# verifier that differs from the one cached (a changed password, a dropped user),
# ``on_change`` runs: the gate clears that user's server connections, whose logins were
# made with ClientKeys of the old verifier, and a client logged in with the old verifier
# is logged out at its next message (``is_current``, asked by the gate). Until a refetch
# (the next login of that user after the time-out) nothing is noticed, but the servers
# refuse a new server login with an old ClientKey. Nothing here holds a password or a
# ClientKey.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from dvara_lib.errors import AuthQueryFailure, ConnectionFailure
from dvara_lib.security import scram
from dvara_lib.security.userfile import User

log = logging.getLogger("dvara.auth")

#: (db, name) of a user.
Key = tuple[str, str]
#: Runs usersInfo for one user on a server and returns the reply document.
Fetch = Callable[[], dict[str, Any]]
_KEYS = ("salt", "storedKey", "serverKey")


def credentials_from_users_info(reply: dict[str, Any], db: str, name: str
                                ) -> Optional[dict[str, scram.Credential]]:
    """The SCRAM credentials a usersInfo reply (with showCredentials) holds for db.name,
    or None if it names no such user (or one without SCRAM credentials). Can raise
    AuthQueryFailure (an error reply, a malformed credential)."""
    if not reply.get("ok"):
        raise AuthQueryFailure(f"usersInfo failed: {reply.get('errmsg', 'refused')} "
                               f"(code {reply.get('code', '?')})")
    users = reply.get("users")
    entry = next((u for u in users if isinstance(u, dict) and u.get("user") == name
                  and u.get("db", db) == db), None) if isinstance(users, list) else None
    found = entry.get("credentials") if entry is not None else None
    if not isinstance(found, dict):
        return None
    creds = {}
    for mechanism in scram.MECHANISMS:
        c = found.get(mechanism)
        if isinstance(c, dict):
            creds[mechanism] = _credential(mechanism, c)
    return creds or None


def _credential(mechanism: str, c: dict[str, Any]) -> scram.Credential:
    try:
        iterations = int(c["iterationCount"])
        salt, stored, server = (_bytes(c[k]) for k in _KEYS)
    except (KeyError, TypeError, ValueError, scram.ScramError) as exc:
        raise AuthQueryFailure(f"usersInfo returned a malformed {mechanism} credential "
                               f"({type(exc).__name__})") from exc
    if iterations < scram.MIN_ITERATIONS:
        raise AuthQueryFailure(f"usersInfo returned a {mechanism} credential with "
                               f"{iterations} iterations (below {scram.MIN_ITERATIONS})")
    return scram.Credential(mechanism, salt, iterations, stored, server)


def _bytes(value: Any) -> bytes:
    """A key as usersInfo gives it: base64 text (mongod, SecantusDB) or binary."""
    if isinstance(value, str):
        return scram.unb64(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError("not base64 text or binary")


class VerifierCache:
    """Users looked up on the servers, each kept for ttl seconds. Thread-safe."""

    def __init__(self, ttl: float, on_change: Callable[[Key], None] = lambda key: None,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10000) -> None:
        self.ttl = ttl
        self.on_change = on_change
        self._clock = clock
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[Key, tuple[float, Optional[User]]] = {}  # key -> expiry, user

    def get(self, db: str, name: str, fetch: Fetch) -> Optional[User]:
        """The user (None: unknown to the servers), fetched unless cached and fresh.
        Can raise AuthQueryFailure (then nothing is cached)."""
        key = (db, name)
        entry = self._entries.get(key)
        if entry is not None and self._clock() < entry[0]:
            return entry[1]
        user = _fetch_user(db, name, fetch)       # a round trip: no lock held
        with self._lock:
            old = self._entries.pop(key, None)
            if len(self._entries) >= self.max_entries:
                self._prune()
            self._entries[key] = (self._clock() + self.ttl, user)
        if old is not None and old[1] is not None and _changed(old[1], user):
            log.info("the servers' verifier of %s.%s changed; clearing its connections",
                     db, name)
            self.on_change(key)
        return user

    def is_current(self, key: Key, credential: scram.Credential) -> bool:
        """False if the servers' verifier of key, as last fetched, is not credential (a
        client logged in with it must log in again); True if it is, or is not cached."""
        entry = self._entries.get(key)
        if entry is None:
            return True
        user = entry[1]
        return user is not None and user.credentials.get(credential.mechanism) == credential

    def _prune(self) -> None:
        """Under the lock: drop expired entries, then the oldest ones."""
        now = self._clock()
        for key in [k for k, (expiry, _) in self._entries.items() if expiry <= now]:
            del self._entries[key]
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]


def _fetch_user(db: str, name: str, fetch: Fetch) -> Optional[User]:
    try:
        reply = fetch()
    except ConnectionFailure as exc:
        raise AuthQueryFailure(str(exc)) from exc
    creds = credentials_from_users_info(reply, db, name)
    return None if creds is None else User(name, db, False, creds)


def _changed(old: User, new: Optional[User]) -> bool:
    """Whether a refetched user's verifiers differ from the cached ones (or it is gone)."""
    return new is None or old.credentials != new.credentials


def users_info_command(db: str, name: str) -> dict[str, Any]:
    """The command that fetches db.name's verifiers (run in database db)."""
    return {"usersInfo": {"user": name, "db": db}, "showCredentials": True}
