"""The proxy's own login to servers: every server connection it opens logs in as its account.

# design:
# ``BackendLogin`` (built from --username/--password(-file)/--auth-source/
# --auth-mechanism) logs a new server connection in right after its handshake, before
# the pool ever hands it out; the monitoring connection logs in too, for its
# replSetGetStatus. A refused login backs the member off (0.5 s doubling to 30 s):
# meanwhile new connections fail at once, without touching the server, and the relay
# answers clients with an error instead of hammering the server or hanging. The
# dvara_lib.backend.connect.Backend owns the one BackendLogin of a process.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Union

from bson.binary import Binary

from dvara_lib import wire
from dvara_lib.address import format_address
from dvara_lib.errors import AuthenticationFailure, ConfigError, ConnectionFailure
from dvara_lib.security import scram

if TYPE_CHECKING:
    from dvara_lib.config import Settings

log = logging.getLogger("dvara.auth")

_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 30.0
_MAX_SASL_STEPS = 5
SaslClient = Union[scram.ScramClient, scram.ScramKeyClient]


class BackendLogin:
    """Logs server connections in as the proxy's account. Thread-safe."""

    def __init__(self, username: str, password: str, source: str, mechanism: str) -> None:
        self.username = username
        self._password = password
        self.source = source
        self.mechanism = scram.check_mechanism(mechanism)
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float, str]] = {}  # member -> n, retry at, why

    @classmethod
    def from_settings(cls, settings: "Settings") -> Optional["BackendLogin"]:
        """The proxy's account per settings; None without --username. Can raise
        ConfigError (an unreadable --password-file)."""
        if not settings.username:
            return None
        return cls(settings.username, backend_password(settings), settings.auth_source,
                   settings.auth_mechanism)

    def login_quietly(self, sock: socket.socket, hello: dict[str, Any], member: str) -> None:
        """Log a monitoring connection in. A refused login is not a dead member: hello
        works without it, and only replSetGetStatus (then empty) needs it. Can raise
        ConnectionFailure."""
        try:
            self.check_backoff(member)
            self.login(sock, hello, member)
        except AuthenticationFailure:
            pass

    def __repr__(self) -> str:
        return f"<BackendLogin {self.source}.{self.username} {self.mechanism}>"

    @property
    def who(self) -> str:
        return f"{self.source}.{self.username}"

    def check_backoff(self, member: str) -> None:
        """Fail at once while member's last login failure is recent. Can raise
        AuthenticationFailure."""
        failure = self._failures.get(member)
        if failure is not None and time.monotonic() < failure[1]:
            raise AuthenticationFailure(
                f"dvara cannot log in to {member} as {self.who} ({failure[2]}); "
                f"next try in {failure[1] - time.monotonic():.1f}s")

    def login(self, sock: socket.socket, hello: dict[str, Any], member: str) -> None:
        """Log sock in (right after its handshake). Can raise AuthenticationFailure, or
        ConnectionFailure for a network error."""
        if hello.get("arbiterOnly"):
            return                            # arbiters hold no users (auth spec)
        try:
            self._converse(sock, int(hello.get("maxWireVersion", 0)))
        except AuthenticationFailure as exc:
            self._failed(member, str(exc))
            raise
        except scram.ScramError as exc:
            self._failed(member, str(exc))
            raise AuthenticationFailure(str(exc)) from exc
        self._succeeded(member)

    def _converse(self, sock: socket.socket, max_wire: int) -> None:
        client = scram.ScramClient(self.mechanism, self.username, self._password)
        sasl_login(sock, max_wire, self.source, client)

    def _failed(self, member: str, why: str) -> None:
        with self._lock:
            count, retry_at, _ = self._failures.get(member, (0, 0.0, ""))
            now = time.monotonic()
            if now >= retry_at:              # not a connection that raced the last failure
                count += 1
                retry_at = now + min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (count - 1))
            self._failures[member] = (count, retry_at, why)
        if count & (count - 1) == 0:        # the 1st, 2nd, 4th, 8th... failure
            log.error("CANNOT LOG IN to %s as %s with %s: %s (%d failure(s)); its clients "
                      "get errors until a login works; next try in %.1fs", member, self.who,
                      self.mechanism, why, count, retry_at - time.monotonic())

    def _succeeded(self, member: str) -> None:
        if member in self._failures:
            with self._lock:
                count = self._failures.pop(member, (0,))[0]
            log.info("logged in to %s as %s again after %d failure(s)", member, self.who, count)


class UserLogin:
    """A client's own login to the servers (--auth-passthrough): the ClientKey recovered
    when it logged in to dvara, with the verifier it was checked against. In memory
    only: never written, logged, or shown (not in repr)."""

    __slots__ = ("db", "name", "credential", "_client_key")

    def __init__(self, db: str, name: str, credential: scram.Credential,
                 client_key: bytes) -> None:
        self.db = db
        self.name = name
        self.credential = credential
        self._client_key = client_key

    @property
    def key(self) -> tuple[str, str]:
        return self.db, self.name

    def login(self, sock: socket.socket, hello: dict[str, Any], member: str) -> None:
        """Log sock in as the user (right after its handshake). Can raise
        AuthenticationFailure, or ConnectionFailure for a network error."""
        if hello.get("arbiterOnly"):
            return
        client = scram.ScramKeyClient(self.credential, self.name, self._client_key)
        try:
            sasl_login(sock, int(hello.get("maxWireVersion", 0)), self.db, client)
        except scram.ScramError as exc:
            raise AuthenticationFailure(str(exc)) from exc

    def __repr__(self) -> str:
        return f"<UserLogin {self.db}.{self.name} {self.credential.mechanism}>"


def sasl_login(sock: socket.socket, max_wire: int, source: str, client: "SaslClient") -> None:
    """Log sock in with client's SCRAM conversation (saslStart, saslContinue...). Can
    raise AuthenticationFailure, ScramError, ConnectionFailure."""
    mechanism = client.mechanism
    reply = _auth_command(sock, max_wire, source, {
        "saslStart": 1, "mechanism": mechanism, "payload": Binary(client.first()),
        "autoAuthorize": 1, "options": {"skipEmptyExchange": True}})
    conversation = reply.get("conversationId")
    final = client.final(scram.payload_bytes(reply.get("payload")))
    reply = _auth_command(sock, max_wire, source, {"saslContinue": 1, "payload": Binary(final),
                                                   "conversationId": conversation})
    client.verify(scram.payload_bytes(reply.get("payload")))
    for _ in range(_MAX_SASL_STEPS):
        if reply.get("done"):
            return
        reply = _auth_command(sock, max_wire, source, {"saslContinue": 1, "payload": Binary(b""),
                                                       "conversationId": conversation})
    raise AuthenticationFailure("the server never ended the SASL conversation")


def _auth_command(sock: socket.socket, max_wire: int, source: str,
                  doc: dict[str, Any]) -> dict[str, Any]:
    """Run one authentication command. Can raise AuthenticationFailure, ConnectionFailure."""
    reply = wire.round_trip(sock, wire.command(doc, source, max_wire))
    if not reply.get("ok"):
        raise AuthenticationFailure(
            f"{reply.get('errmsg', 'refused')} (code {reply.get('code', '?')})")
    return reply


def credential_from_server(address: tuple[str, int], username: str, password: str,
                           source: str, mechanism: str, timeout: float = 10.0
                           ) -> scram.Credential:
    """The verifier of username/password that matches the server's: a login to the server
    at address (plain TCP) learns its salt and iteration count, and proves the password
    right. Can raise AuthenticationFailure, ScramError, ConnectionFailure."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise ConnectionFailure(f"cannot connect to {format_address(*address)}: "
                                f"{exc}") from exc
    try:
        hello = wire.round_trip(sock, wire.op_query("admin.$cmd", {"isMaster": 1}))
        client = scram.ScramClient(mechanism, username, password)
        sasl_login(sock, int(hello.get("maxWireVersion", 0)), source, client)
    finally:
        sock.close()
    salt, iterations = client.server_salt
    return scram.make_credential(mechanism, username, password, iterations, salt)


def backend_password(settings: "Settings") -> str:
    """--password, or the first line of --password-file. Can raise ConfigError."""
    if settings.password_file:
        try:
            with open(settings.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"--password-file: cannot read {settings.password_file}: "
                              f"{exc.strerror or exc}") from exc
    return settings.password or ""
