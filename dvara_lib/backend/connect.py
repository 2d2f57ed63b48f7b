"""How the proxy opens its own connections to servers: TCP, TLS, handshake, login.

# design:
# One ``Backend`` per process, built from the settings at start, owns everything a new
# server connection needs: the TLS context of --backend-tls, the proxy's own account
# (dvara_lib.security.login) and the handshake. The pools (``open_pooled``), the
# monitors (``open_monitor``) and the start-up probes (``probe``) all open their
# connections through it, so there is one way to reach a server and no process-wide
# state: a test or a worker process builds its own.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, Optional, Union

from dvara_lib import wire
from dvara_lib.address import format_address
from dvara_lib.backend.pool import Compressed
from dvara_lib.errors import ConnectionFailure, ProtocolError
from dvara_lib.security.login import BackendLogin, UserLogin
from dvara_lib.security.tls import backend_context_or_none

if TYPE_CHECKING:
    from dvara_lib.backend.topology import Member
    from dvara_lib.config import Settings

log = logging.getLogger("dvara.backend")

_CONNECT_TIMEOUT = 10.0
CLIENT_METADATA = {"driver": {"name": "dvara", "version": ""}, "os": {"type": "Linux"}}


def handshake_doc(app_version: str, compressors: tuple[str, ...] = ()) -> dict[str, Any]:
    meta = {**CLIENT_METADATA, "driver": {"name": "dvara", "version": app_version}}
    doc: dict[str, Any] = {"isMaster": 1, "helloOk": True, "client": meta}
    if compressors:
        doc["compression"] = list(compressors)
    return doc


def hello_request(max_wire_version: int, first: bool, app_version: str = "",
                  compressors: tuple[str, ...] = ()) -> bytes:
    """The proxy's own hello: OP_MSG for 3.6+, legacy OP_QUERY isMaster otherwise; the
    first one of a connection offers compressors."""
    if first or max_wire_version < wire.OP_MSG_WIRE_VERSION:
        doc = handshake_doc(app_version, compressors) if first else {"isMaster": 1}
        return wire.op_query("admin.$cmd", doc)
    return wire.op_msg({"hello": 1, "$db": "admin"})


def agreed_compressor(hello: dict[str, Any], offered: tuple[str, ...]) -> Optional[int]:
    """The id of the compressor a server's handshake reply chose: the first one it lists
    that was offered; None if it lists none."""
    listed = hello.get("compression")
    if not offered or not isinstance(listed, list):
        return None
    name = next((c for c in listed if c in offered), None)
    return None if name is None else wire.COMPRESSOR_IDS[name]


def run_hello(sock: socket.socket, request: bytes) -> dict[str, Any]:
    """Send a hello on sock and return the reply document. Can raise ConnectionFailure."""
    doc = wire.round_trip(sock, request)
    if not doc.get("ok"):
        raise ConnectionFailure(f"hello failed: {doc.get('errmsg', doc)}")
    return doc


class Backend:
    """Opens server connections. Thread-safe (the login is; the rest is read-only)."""

    def __init__(self, tls: Optional[ssl.SSLContext] = None,
                 login: Optional[BackendLogin] = None, app_version: str = "",
                 compressors: tuple[str, ...] = ()) -> None:
        self.tls = tls
        self.login = login
        self.app_version = app_version
        self.compressors = compressors     # offered on pooled connections

    @classmethod
    def from_settings(cls, settings: "Settings", app_version: str = "") -> "Backend":
        """Can raise ConfigError (unreadable certificate, key or password file)."""
        return cls(backend_context_or_none(settings), BackendLogin.from_settings(settings),
                   app_version, settings.backend_compressors)

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection to a server, in TLS with --backend-tls (the certificate must
        name address's host). Can raise ConnectionFailure."""
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            raise ConnectionFailure(
                f"cannot connect to {format_address(*address)}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            return sock
        try:
            return self.tls.wrap_socket(sock, server_hostname=address[0])
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ConnectionFailure(f"TLS handshake with {format_address(*address)} failed: "
                                    f"{exc}") from exc

    def probe(self, address: tuple[str, int], timeout: float) -> dict[str, Any]:
        """One hello from a server on a short-lived connection. Can raise
        ConnectionFailure."""
        sock = self.connect(address, timeout)
        try:
            return run_hello(sock, hello_request(0, first=True))
        finally:
            sock.close()

    def open_pooled(self, member: "Member", timeout: float
                    ) -> Union[socket.socket, Compressed]:
        """A connection for member's pool: handshake and login done, every read and
        write then bounded by timeout; Compressed when the handshake agreed on one of
        --backend-compressors. Can raise ConnectionFailure (AuthenticationFailure when
        the login is refused or backed off)."""
        if self.login is not None:
            self.login.check_backoff(member.real)   # no new connection while logins fail
        return self._open_pooled(member, timeout, self.login)

    def open_pooled_as(self, member: "Member", timeout: float,
                       login: Optional[UserLogin]) -> Union[socket.socket, Compressed]:
        """open_pooled, logged in as a client's own user (--auth-passthrough), or not
        at all with login None. Can raise ConnectionFailure (AuthenticationFailure)."""
        return self._open_pooled(member, timeout, login)

    def _open_pooled(self, member: "Member", timeout: float,
                     login: Optional[Union[BackendLogin, UserLogin]]
                     ) -> Union[socket.socket, Compressed]:
        sock = self.connect(member.address, min(timeout, _CONNECT_TIMEOUT))
        try:
            hello = run_hello(sock, hello_request(member.max_wire_version, True,
                                                  self.app_version, self.compressors))
            if login is not None:
                login.login(sock, hello, member.real)
            wire.set_io_timeout(sock, timeout)
        except (ConnectionFailure, ProtocolError, OSError) as exc:
            sock.close()
            if isinstance(exc, ConnectionFailure):
                raise
            raise ConnectionFailure(f"handshake with {member.real} failed: {exc}") from exc
        compressor = agreed_compressor(hello, self.compressors)
        if compressor is None:
            if self.compressors:
                log.debug("%s agreed to none of %s; this connection is plain", member.real,
                          ",".join(self.compressors))
            return sock
        return Compressed(sock, compressor)

    def command_as_proxy(self, member: "Member", doc: dict[str, Any], db: str,
                         timeout: float) -> dict[str, Any]:
        """Run one command (e.g. --auth-query's usersInfo) in db on a short-lived
        connection to member logged in as the proxy's account; every step is bounded by
        timeout. Returns the reply document. Can raise ConnectionFailure
        (AuthenticationFailure: the proxy's login was refused or is backed off)."""
        opened = self.open_pooled(member, timeout)
        sock = opened.sock if isinstance(opened, Compressed) else opened   # sent plain
        try:
            return wire.round_trip(sock, wire.command(doc, db, member.max_wire_version))
        except (ProtocolError, OSError) as exc:
            raise ConnectionFailure(f"command on {member.real} failed: {exc}") from exc
        finally:
            sock.close()

    def open_monitor(self, member: "Member", timeout: float
                     ) -> tuple[socket.socket, dict[str, Any]]:
        """A monitoring connection to member and its first hello; logged in if the
        account is accepted (only replSetGetStatus needs it). Can raise
        ConnectionFailure, ProtocolError."""
        sock = self.connect(member.address, timeout)
        try:
            hello = run_hello(sock, hello_request(0, True, self.app_version))
            if self.login is not None:
                self.login.login_quietly(sock, hello, member.real)
        except BaseException:
            sock.close()
            raise
        return sock, hello
