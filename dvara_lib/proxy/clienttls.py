"""TLS for clients of the listeners, run step by step in the acceptor.

# design:
# The acceptor owns idle client sockets and reads them non-blocking, so the TLS
# handshake runs there too, a step per readable event, never blocking the thread:
# ``ClientTLS.admit`` gives a new client a ``reader`` that ``ClientConn.fill`` calls
# instead of its plain recv. With --tls-mode allow the first reader peeks at the first
# byte (0x16 opens a TLS handshake record) and then goes TLS or stays plain. Once the
# handshake is done the reader decrypts what the socket has, and drains whatever
# OpenSSL holds already decrypted (``pending``), which select() cannot see. The socket
# is switched to non-blocking only inside the reader: workers write to it with the
# usual --message-timeout, and only ever when the acceptor is not reading it. The
# acceptor closes a client whose handshake is not done within ``handshake_timeout``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Optional

from dvara_lib.proxy.client import Fill
from dvara_lib.security.tls import ALLOW, listener_context

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.proxy.client import ClientConn

log = logging.getLogger("dvara.tls")

#: The first byte of a TLS record carrying a handshake (a ClientHello).
TLS_HANDSHAKE_BYTE = 0x16
_TLS_READ_CHUNK = 256 * 1024
_WAITING = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


class _Throttle:
    """At most one log line per interval; counts what it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.interval
        suffix = f" (and {held} more like it in the last {self.interval:.0f}s)" if held else ""
        log.log(level, msg + suffix, *args)


class ClientTLS:
    """TLS for accepted clients. Methods for the acceptor: admit(), handshaking()."""

    def __init__(self, context: ssl.SSLContext, mode: str, handshake_timeout: float) -> None:
        self.context = context
        self.mode = mode
        self.handshake_timeout = handshake_timeout
        self._failures = _Throttle()

    @classmethod
    def from_settings(cls, settings: "Settings") -> Optional["ClientTLS"]:
        """None unless --tls-mode is allow or require. Can raise ConfigError."""
        context = listener_context(settings)
        if context is None:
            return None
        return cls(context, settings.tls_mode, min(settings.message_timeout, 10.0))

    def admit(self, client: "ClientConn") -> None:
        """Give a new client its TLS reader (its socket is still plain)."""
        client.reader = self._peek if self.mode == ALLOW else self._start

    def handshaking(self, client: "ClientConn") -> bool:
        """True while client has not finished (or started) its handshake."""
        return client.reader in (self._peek, self._start, self._handshake)

    def _peek(self, client: "ClientConn", limit: int) -> Fill:
        """--tls-mode allow: TLS if the first byte opens a handshake, plain otherwise."""
        sock = client.sock
        sock.settimeout(0.0)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except _WAITING:
            return Fill.DRAINED
        except OSError:
            return Fill.CLOSED
        finally:
            sock.settimeout(None)
        if not first:
            return Fill.CLOSED
        if first[0] == TLS_HANDSHAKE_BYTE:
            return self._start(client, limit)
        client.reader = None
        return client.fill(limit)

    def _start(self, client: "ClientConn", limit: int) -> Fill:
        try:
            client.sock = self.context.wrap_socket(client.sock, server_side=True,
                                                   do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            self._failed(client, exc)
            return Fill.CLOSED
        client.sock.settimeout(None)
        client.reader = self._handshake
        return self._handshake(client, limit)

    def _handshake(self, client: "ClientConn", limit: int) -> Fill:
        sock = client.sock
        sock.settimeout(0.0)
        try:
            sock.do_handshake()
        except _WAITING:
            return Fill.DRAINED
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self._failed(client, exc)
            return Fill.CLOSED
        finally:
            sock.settimeout(None)
        client.reader = read
        log.debug("%s: TLS %s %s", client, sock.version(), (sock.cipher() or ("?",))[0])
        return read(client, limit)    # the client may have sent its first message already

    def _failed(self, client: "ClientConn", exc: BaseException) -> None:
        reason = getattr(exc, "reason", None) or exc
        self._failures.log(logging.WARNING, "TLS handshake with a client from %s on %s "
                           "failed: %s", client.peer_ip, client.member.proxy, reason)


def read(client: "ClientConn", limit: int) -> Fill:
    """Read what a TLS client sent (non-blocking), draining OpenSSL's decrypted bytes."""
    sock = client.sock
    sock.settimeout(0.0)
    try:
        got = 0
        while True:
            data = _recv_tls(client)
            if isinstance(data, Fill):
                return data
            client.took(data)
            got += len(data)
            if got >= limit and not sock.pending():
                return Fill.MORE      # the rest is in the kernel: read it later
    finally:
        sock.settimeout(None)


def _recv_tls(client: "ClientConn") -> "bytes | Fill":
    """What OpenSSL has decrypted for client now, or DRAINED (nothing yet) or CLOSED."""
    try:
        data = client.sock.recv(_TLS_READ_CHUNK)
    except _WAITING:
        return Fill.DRAINED
    except (ssl.SSLError, OSError) as exc:
        log.debug("client %s: TLS read failed: %s", client.peer, exc)
        return Fill.CLOSED
    return data or Fill.CLOSED
