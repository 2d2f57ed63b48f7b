"""One client connection: its socket, the bytes read so far, and its per-connection state.

# design:
# A client is owned by exactly one thread at a time: the acceptor while it is idle or
# parked (its socket registered in the selector), a worker while one of its messages is
# being relayed (its socket unregistered). The acceptor assembles whole frames with
# non-blocking reads (``fill``); a worker only ever writes to the socket.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional

from dvara_lib import wire

if TYPE_CHECKING:
    from dvara_lib.auth import ClientAuth
    from dvara_lib.legacy import LastError
    from dvara_lib.pool import ServerConnection
    from dvara_lib.topology import Member

log = logging.getLogger("dvara.client")

_INT32 = struct.Struct("<i")
_READ_CHUNK = 64 * 1024  # larger buffers cost an mmap/munmap per recv
_connection_ids = itertools.count(1)


class _Tee:
    """--tee-file: a copy of every byte sent to clients (debugging and tests)."""

    def __init__(self) -> None:
        self.file: Optional[BinaryIO] = None
        self.lock = threading.Lock()

    def open(self, path: Optional[str]) -> None:
        self.file = open(path, "ab", buffering=0) if path else None

    def write(self, data: bytes) -> None:
        with self.lock:
            self.file.write(data)


TEE = _Tee()


class ParkedHello:
    """An awaitable hello waiting, without a thread, for a topology change or its deadline."""

    __slots__ = ("frame", "request", "command", "deadline", "exhaust", "counter")

    def __init__(self, frame: bytes, request: dict[str, Any], command: str, deadline: float,
                 exhaust: bool, counter: int) -> None:
        self.frame = frame
        self.request = request
        self.command = command
        self.deadline = deadline
        self.exhaust = exhaust
        self.counter = counter


class ClientConn:
    """A client socket accepted on one member's listener."""

    def __init__(self, sock: socket.socket, peer: tuple[Any, ...], member: "Member",
                 message_timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.peer_ip = str(peer[0])
        self.member = member
        self.id = next(_connection_ids)
        self.buf = bytearray()
        self.compressors: list[str] = []
        self.parked: Optional[ParkedHello] = None
        self.pinned: Optional["ServerConnection"] = None
        self.pin_deadline = 0.0
        self.last_error: Optional["LastError"] = None   # made at its first legacy message
        self.last_active = time.monotonic()
        self.closed = False
        self.closing = False        # close after the message in flight
        # issue 7: login state (dvara_lib.auth), and the TLS reader that fill() uses
        # instead of a plain recv (dvara_lib.tls)
        self.auth: Optional["ClientAuth"] = None
        self.reader: Optional[Callable[["ClientConn"], bool]] = None
        wire.set_io_timeout(sock, message_timeout)   # bounds a worker's writes

    def fill(self) -> bool:
        """Read what the socket has (it is readable). False on EOF or a read error."""
        if self.reader is not None:             # issue 7: TLS (dvara_lib.tls)
            return self.reader(self)
        try:
            data = self.sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return True
        except OSError as exc:
            log.debug("client %s: read failed: %s", self.peer, exc)
            return False
        if not data:
            return False
        self.buf += data
        self.member.stats.incr("bytes.in", len(data))
        self.last_active = time.monotonic()
        return True

    def next_frame(self) -> Optional[bytes]:
        """Pop one whole message from the buffer, or None. Can raise ProtocolError."""
        buf = self.buf
        if len(buf) < 4:
            return None
        length = _INT32.unpack_from(buf, 0)[0]
        wire.check_length(length)
        if len(buf) < length:
            return None
        if len(buf) == length:          # the usual case: one message, copied once
            frame = bytes(buf)
            buf.clear()
            return frame
        with memoryview(buf) as view:
            frame = bytes(view[:length])
        del buf[:length]
        return frame

    def send(self, data: bytes) -> bool:
        """Write data to the client; False if the client is gone or too slow."""
        if TEE.file is not None:
            TEE.write(data)
        try:
            self.sock.sendall(data)
            self.member.stats.incr("bytes.out", len(data))
            return True
        except OSError as exc:
            log.debug("client %s: write failed: %s", self.peer, exc)
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<client #{self.id} {self.peer_ip}:{self.peer[1]} on {self.member.proxy}>"
