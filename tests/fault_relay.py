"""A fault-injecting TCP relay the tests put between dvara and a server.

# design:
# One thread owns a selector with the listening socket and every connection pair
# (downstream: the peer that connected to the relay, dvara; upstream: the server). In
# ``PASS`` mode bytes are forwarded both ways; server-to-dvara bytes are forwarded
# whole frame by frame so that ``rewrite`` (a same-length byte substitution, used to
# make a server advertise the relay's address instead of its own) never meets a split
# string. Other threads only set the mode or ask for a drop; the relay thread applies
# it (a wake-up socketpair). Faults:
#   drop()            every open pair is reset (RST both ways); new connections pass
#   BLACKHOLE         nothing is read or forwarded; sockets stay open, new ones too
#   GARBAGE           dvara's messages are swallowed; each is answered with ``garbage``
#   REFUSE            new connections are reset at once; open pairs keep forwarding
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Optional

PASS, BLACKHOLE, GARBAGE, REFUSE = "pass", "blackhole", "garbage", "refuse"

_LINGER_RST = struct.pack("ii", 1, 0)
_CHUNK = 256 * 1024


def _reset(sock: socket.socket) -> None:
    """Close sock with an RST (SO_LINGER 0), as a network failure looks to its peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


class _Pair:
    __slots__ = ("down", "up", "from_up", "closed")

    def __init__(self, down: socket.socket, up: socket.socket) -> None:
        self.down = down
        self.up = up
        self.from_up = bytearray()   # server bytes not yet a whole frame
        self.closed = False


class FaultRelay:
    """Forwards 127.0.0.1:port to target until told to misbehave.

    Methods: start() -> port, address, set_mode(mode, garbage=b""), drop(), pairs(), close().
    """

    def __init__(self, target: tuple[str, int], advertise: bool = False) -> None:
        """advertise: rewrite the server's own address to the relay's in what it sends
        (its hello names the relay, so dvara's member connections all pass through)."""
        self.target = target
        self.mode = PASS
        self.garbage = b""
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.rewrite: Optional[tuple[bytes, bytes]] = None
        if advertise:
            old, new = f"{target[0]}:{target[1]}".encode(), f"127.0.0.1:{self.port}".encode()
            if len(old) != len(new):
                self._listener.close()
                raise ValueError(f"cannot advertise {new!r} for {old!r}: BSON sizes would change")
            self.rewrite = (old, new)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pairs: set[_Pair] = set()
        self._commands: list[tuple[str, bytes, threading.Event]] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="fault-relay", daemon=True)

    # -- for the test -----------------------------------------------------------------
    def start(self) -> int:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: str, garbage: bytes = b"") -> None:
        self._command(mode, garbage)

    def drop(self) -> None:
        """Reset every open connection pair (both sides get an RST)."""
        self._command("drop", b"")

    def pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._running = False
        if self._thread.ident is None:       # never started: nothing else owns the sockets
            self._release()
            return
        self._command("stop", b"")
        self._thread.join(10)

    # -- the relay thread ---------------------------------------------------------------
    def _command(self, what: str, garbage: bytes) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((what, garbage, done))
        try:
            self._wake_w.send(b"x")
        except OSError:
            return
        if self._thread.is_alive():
            done.wait(10)

    def _run(self) -> None:
        try:
            while self._running:
                for key, _ in self._selector.select(0.5):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._run_commands()
                    else:
                        self._forward(*key.data)
        finally:
            self._release()

    def _release(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair, rst=True)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            commands, self._commands = self._commands, []
        for what, garbage, done in commands:
            if what == "drop":
                for pair in list(self._pairs):
                    self._close_pair(pair, rst=True)
            elif what != "stop":
                self.mode, self.garbage = what, garbage
                for pair in self._pairs:
                    self._watch(pair)
            done.set()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            if self.mode == REFUSE:
                _reset(down)
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(down)
                continue
            for sock in (down, up):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(down, up)
            with self._lock:
                self._pairs.add(pair)
            self._watch(pair)

    def _watch(self, pair: _Pair) -> None:
        """Register pair's sockets for what the current mode reads."""
        for sock, side in ((pair.down, "down"), (pair.up, "up")):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            reads = self.mode in (PASS, REFUSE) or (self.mode == GARBAGE and side == "down")
            if reads and not pair.closed:
                self._selector.register(sock, selectors.EVENT_READ, (pair, side))

    def _forward(self, pair: _Pair, side: str) -> None:
        src = pair.down if side == "down" else pair.up
        try:
            data = src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pair(pair, rst=False)
            return
        try:
            if self.mode == GARBAGE:
                self._send(pair.down, self.garbage)
            elif side == "down":
                self._send(pair.up, data)
            else:
                self._send(pair.down, self._whole_frames(pair, data))
        except OSError:
            self._close_pair(pair, rst=True)

    def _whole_frames(self, pair: _Pair, data: bytes) -> bytes:
        buf = pair.from_up
        buf += data
        end = 0
        while len(buf) - end >= 4:
            length = struct.unpack_from("<i", buf, end)[0]
            if length < 16 or len(buf) - end < length:
                break
            end += length
        out = bytes(buf[:end])
        del buf[:end]
        if self.rewrite is not None:
            out = out.replace(*self.rewrite)
        return out

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> None:
        if data:
            sock.setblocking(True)
            sock.settimeout(5)
            try:
                sock.sendall(data)
            finally:
                sock.setblocking(False)

    def _close_pair(self, pair: _Pair, rst: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        with self._lock:
            self._pairs.discard(pair)
        for sock in (pair.down, pair.up):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if rst:
                _reset(sock)
            else:
                sock.close()
