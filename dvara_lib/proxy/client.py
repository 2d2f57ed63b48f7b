"""One client connection: its socket, the bytes read so far, and who owns it.

# design:
# A client is owned by exactly one thread at a time. The acceptor owns it while it is
# idle or parked: it reads what the client sends (non-blocking) and assembles whole
# frames. A worker owns it from the moment the acceptor hands it a frame until the
# worker lets go: ``busy`` is True for exactly that span, and the socket's one-shot
# registration is disarmed meanwhile. Letting go (``release``) arms it again; an event
# that comes before ``busy`` is cleared only sets ``pending`` (under ``lock``), and the
# worker reads what came itself. So a worker that is done with a client gives it back
# with one epoll_ctl and no wake-up of the acceptor, unless the acceptor has to act
# (park a hello, close, drain): then it hands the client back with a ``Verdict``
# through ``Acceptor.handback``. Only the acceptor sets ``parked``.
#
# Memory: every byte buffered for an incomplete message is counted in one ``Budget``
# (--max-buffered-bytes); the acceptor stops reading clients that are mid-message while
# the budget is spent (TCP pushes back) and lets one of them at a time finish its
# message, so the buffers always drain.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import select
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional, Sequence

from dvara_lib import wire

if TYPE_CHECKING:
    from dvara_lib.proxy.session import ClientAuth, LastError
    from dvara_lib.backend.pool import ServerConnection
    from dvara_lib.backend.topology import Member

log = logging.getLogger("dvara.client")

#: Module constants read once per message (a global is cheaper than a global's attribute).
_DONTWAIT = socket.MSG_DONTWAIT
_TLS_SOCKET = ssl.SSLSocket
_READ_CHUNK = wire.READ_CHUNK
_int32_at = wire.INT32.unpack_from
#: How many locks the clients of one acceptor share (a prime: ids may step by the
#: number of processes).
_CLIENT_LOCKS = 61


class Verdict(enum.Enum):
    """What a worker tells the acceptor when it hands a client back."""

    RESUME = "resume"   # read its next message
    PARK = "park"       # hold its awaitable hello (the ParkedHello comes with it)
    CLOSE = "close"     # close it


class Fill(enum.Enum):
    """What one ``ClientConn.fill`` call found."""

    CLOSED = "closed"     # end of stream or a read error
    DRAINED = "drained"   # read everything the socket had
    MORE = "more"         # stopped at the limit: the socket may hold more


class Budget:
    """The bytes buffered for clients' incomplete messages, in all (--max-buffered-bytes).

    Thread-safe; reading ``spent`` takes no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def add(self, n: int) -> None:
        with self._lock:
            self.used += n


class ClientIO:
    """What every client of one acceptor shares: the byte budget, the write time-out
    (--message-timeout, live), how long a worker waits for a client's next message, the
    --tee-file writer, and the connection ids."""

    def __init__(self, budget: Budget, write_timeout: float, linger: float = 0.0,
                 tee: Optional["Tee"] = None, first_id: int = 1, id_step: int = 1) -> None:
        self.budget = budget
        #: Connection ids (hello's connectionId), unique across the processes of a dvara.
        self.ids = itertools.count(first_id, id_step)
        #: The locks that guard clients' ownership (busy, pending), each shared by every
        #: client whose id falls on it: held for a few steps, never two at once.
        self.locks = [threading.Lock() for _ in range(_CLIENT_LOCKS)]
        self.write_timeout = write_timeout
        self.linger = linger
        self.tee = tee
        #: Arms a client's registration again (set by the acceptor).
        self.rearm: Callable[["ClientConn"], None] = lambda client: None


class Tee:
    """--tee-file: a copy of every byte sent to clients (debugging and tests)."""

    def __init__(self, path: str) -> None:
        self.file: BinaryIO = open(path, "ab", buffering=0)
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.file.write(data)

    def close(self) -> None:
        self.file.close()


class ParkedHello:
    """An awaitable hello waiting, without a thread, for a topology change or its deadline.

    It keeps the hello's frame, not its decoded document: a third of a fleet's idle
    connections park a hello, and the document costs several times the frame's bytes;
    it is decoded again when the answer is due (once per topology change or maxAwait)."""

    __slots__ = ("frame", "command", "deadline", "exhaust", "counter")

    def __init__(self, frame: bytes, command: str, deadline: float, exhaust: bool,
                 counter: int) -> None:
        self.frame = frame
        self.command = command
        self.deadline = deadline
        self.exhaust = exhaust
        self.counter = counter


#: A TLS client's reader (dvara_lib.security.tls), called by fill() instead of a plain recv.
Reader = Callable[["ClientConn", int], Fill]


class ClientConn:
    """A client socket accepted on one member's listener."""

    __slots__ = ("sock", "peer", "peer_ip", "member", "io", "id", "buf", "counted",
                 "compressors", "parked", "pinned", "pin_deadline", "last_error",
                 "last_active", "closed", "closing", "lock", "busy", "pending", "auth",
                 "reader", "__weakref__")

    def __init__(self, sock: socket.socket, peer: tuple[Any, ...], member: "Member",
                 io: ClientIO) -> None:
        self.sock = sock
        self.peer = peer
        self.peer_ip = str(peer[0])
        self.member = member
        self.io = io
        self.id = next(io.ids)
        self.buf = bytearray()
        self.counted = 0            # bytes of buf charged to the budget
        self.compressors: Sequence[str] = ()            # agreed at its hello
        self.parked: Optional[ParkedHello] = None       # set by the acceptor only
        self.pinned: Optional["ServerConnection"] = None
        self.pin_deadline = 0.0
        self.last_error: Optional["LastError"] = None   # made at its first legacy message
        self.last_active = time.monotonic()
        self.closed = False
        self.closing = False        # close after the message in flight
        self.lock = io.locks[self.id % len(io.locks)]   # shared: a lock each costs 88 bytes
        self.busy = False           # a worker owns it (guarded by lock)
        self.pending = False        # it became readable while busy (guarded by lock)
        self.auth: Optional["ClientAuth"] = None        # login state (dvara_lib.proxy.gate)
        self.reader: Optional[Reader] = None
        sock.settimeout(None)
        if linger_allowed(sock) and io.linger > 0:
            wire.set_recv_timeout(sock, io.linger)

    # -- reading (by the owner) ---------------------------------------------------------
    def fill(self, limit: int = 4 * wire.READ_CHUNK, to_the_end: bool = True) -> Fill:
        """Read what the socket has without blocking, up to about limit bytes.

        to_the_end: read until the socket says it has nothing more (an end of stream
        that came with the data is then seen now). Without it a short read is taken to
        mean the socket is empty: the acceptor does so when its event did not say the
        peer hung up, since arming the registration again reports anything left.
        """
        if self.reader is not None:             # TLS (dvara_lib.security.tls)
            return self.reader(self, limit)
        got = 0
        while got < limit:
            want = min(wire.READ_CHUNK, limit - got)
            try:
                data = self.sock.recv(want, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return Fill.DRAINED
            except OSError as exc:
                log.debug("client %s: read failed: %s", self.peer, exc)
                return Fill.CLOSED
            if not data:
                return Fill.CLOSED
            self.took(data)
            got += len(data)
            if len(data) < want and not to_the_end:
                return Fill.DRAINED
        return Fill.MORE

    def wait_message(self) -> Optional[bytes]:
        """Wait up to the linger time for the client's next whole message (worker only).

        None if none came in time (or the client closed: the acceptor sees that).
        """
        try:
            data = self.sock.recv(_READ_CHUNK)
        except OSError:         # timed out (the usual miss), or broken: the acceptor sees it
            return None
        if not data:
            self.closing = True
            return None
        if not self.buf and len(data) >= 16 and _int32_at(data, 0)[0] == len(data):
            self.last_active = time.monotonic()     # the usual case: one whole message
            return data
        self.took(data)
        return self.next_frame()

    def took(self, data: bytes) -> None:
        """Append bytes read from the socket to the buffer (charged to the budget when
        they are found to be part of an incomplete message)."""
        self.buf += data
        self.last_active = time.monotonic()

    def next_frame(self) -> Optional[bytes]:
        """Pop one whole message from the buffer, or None. Can raise ProtocolError."""
        buf = self.buf
        if len(buf) < 4:
            self.settle()
            return None
        length = wire.INT32.unpack_from(buf, 0)[0]
        wire.check_length(length)
        if len(buf) < length:
            self.settle()
            return None
        if len(buf) == length:          # the usual case: one message, copied once
            frame = bytes(buf)
            buf.clear()
        else:
            with memoryview(buf) as view:
                frame = bytes(view[:length])
            del buf[:length]
        if self.counted:
            self.settle()
        return frame

    def has_frame(self) -> bool:
        """A whole message (or a header next_frame will refuse) is buffered."""
        buf = self.buf
        return len(buf) >= 4 and wire.INT32.unpack_from(buf, 0)[0] <= len(buf)

    def mid_message(self) -> bool:
        """Part of a message is buffered (and not a whole one)."""
        return bool(self.buf) and not self.has_frame()

    def settle(self) -> None:
        """Charge the budget with what the buffer holds now (nothing, usually)."""
        delta = len(self.buf) - self.counted
        if delta:
            self.counted += delta
            self.io.budget.add(delta)

    # -- ownership ----------------------------------------------------------------------
    def take(self) -> None:
        """The acceptor hands the client to a worker."""
        self.busy = True

    def release(self) -> bool:
        """A worker lets go. False if the client became readable meanwhile: the worker
        still owns it and must read what came (then call release again). Can raise
        OSError (the socket is broken: the worker still owns the client)."""
        self.io.rearm(self)
        with self.lock:
            if self.pending:
                self.pending = False
                return False
            self.busy = False
            return True

    def readable_while_busy(self) -> bool:
        """The acceptor saw an event. True if a worker owns the client (noted for it)."""
        with self.lock:
            if self.busy:
                self.pending = True
            return self.busy

    # -- writing (by the owner) -----------------------------------------------------------
    def send(self, data: bytes, count: bool = True) -> bool:
        """Write all of data within the write time-out, counted for the whole write
        (and in bytes.out, unless the caller counts it).

        False if the client is gone or too slow (it is then to be closed).
        """
        if self.io.tee is not None:
            self.io.tee.write(data)
        sock = self.sock
        try:
            if isinstance(sock, _TLS_SOCKET):
                ok = _send_tls(sock, data, self.io.write_timeout)
            else:
                try:
                    sent = sock.send(data, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                # The usual case: written at once.
                ok = sent == len(data) or _send_rest(sock, data, sent, self.io.write_timeout)
        except OSError as exc:
            log.debug("client %s: write failed: %s", self.peer, exc)
            return False
        if not ok:
            log.info("closing %s: it did not read its reply within %.1fs", self,
                     self.io.write_timeout)
            return False
        if count:
            self.member.stats.incr("bytes.out", len(data))
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.buf = bytearray()
            self.settle()
            with contextlib.suppress(OSError):
                self.sock.close()

    def __repr__(self) -> str:
        return f"<client #{self.id} {self.peer_ip}:{self.peer[1]} on {self.member.proxy}>"


def linger_allowed(sock: socket.socket) -> bool:
    """A worker may wait on the socket itself (a TLS socket is read by the acceptor only)."""
    return not isinstance(sock, ssl.SSLSocket)


def _send_rest(sock: socket.socket, data: bytes, sent: int, timeout: float) -> bool:
    """Write the rest of data (sent bytes are written) to a plain socket; False if it
    takes longer than timeout in all. Can raise OSError."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    with memoryview(data) as view:
        while sent < len(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return False
            try:
                sent += sock.send(view[sent:], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
    return True


def _send_tls(sock: ssl.SSLSocket, data: bytes, timeout: float) -> bool:
    """Write data to a TLS socket; False if it takes longer than timeout in all."""
    deadline = time.monotonic() + timeout
    sent = 0
    with memoryview(data) as view:
        while sent < len(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.settimeout(remaining)
            try:
                sent += sock.send(view[sent:sent + 256 * 1024])
            except socket.timeout:
                return False
            finally:
                sock.settimeout(None)
    return True
