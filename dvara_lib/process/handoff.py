"""Handing idle client connections from an old dvara process to its replacement.

# design:
# On SIGUSR2 the old process listens on a unix SOCK_SEQPACKET socket (path in
# DVARA_HANDOFF) and starts the new process with the listening sockets inherited
# (DVARA_LISTEN_FDS). When the new process serves, it connects and sends READY. The old
# one then stops accepting and sends each client between two messages as one packet:
# its description (dvara_lib.proxy.handover) with the socket attached by SCM_RIGHTS.
# DONE ends the stream.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from typing import Any, Callable, Optional

from dvara_lib.proxy.handover import decode

log = logging.getLogger("dvara.handoff")

HANDOFF_ENV = "DVARA_HANDOFF"
LISTEN_FDS_ENV = "DVARA_LISTEN_FDS"
READY = b"READY"
DONE = b"DONE"
_MAX_PACKET = 4 * 1024 * 1024


def encode_listen_fds(fds: dict[int, list[int]]) -> str:
    """port=fd[:fd...],... (one listening socket per process, all on the port)."""
    return ",".join(f"{port}={':'.join(map(str, group))}" for port, group in fds.items())


def inherited_listeners() -> dict[int, list[int]]:
    """port → listening fds passed down by the process we replace."""
    text = os.environ.pop(LISTEN_FDS_ENV, "")
    out = {}
    for item in filter(None, text.split(",")):
        port, _, fds = item.partition("=")
        out[int(port)] = [int(fd) for fd in fds.split(":")]
    return out


class Sender:
    """The old process's end: wait for READY, then send clients. Can raise OSError."""

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="dvara-handoff-"), "sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._conn: Optional[socket.socket] = None

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> bool:
        """True once the new process says READY; False if it died or timed out."""
        deadline = time.monotonic() + timeout
        self._listener.settimeout(0.2)
        while time.monotonic() < deadline and alive():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(max(deadline - time.monotonic(), 0.1))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_PACKET)
            try:
                if conn.recv(64) == READY:
                    self._conn = conn
                    conn.settimeout(30)
                    return True
            except OSError:
                pass
            conn.close()
        return False

    def send_client(self, sock: socket.socket, meta: bytes) -> bool:
        """Move one client's socket to the new process; False if that failed."""
        if self._conn is None:
            return False
        try:
            socket.send_fds(self._conn, [meta], [sock.fileno()])
            return True
        except OSError as exc:
            log.error("could not hand a client (fd %s) to the new process: %s", sock.fileno(), exc)
            return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(DONE)
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        self._listener.close()
        try:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass


def receive(path: str, adopt: Callable[[socket.socket, dict[str, Any]], None],
            timeout: float) -> int:
    """The new process's end: say READY, adopt clients until DONE. Returns how many."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _MAX_PACKET)
    conn.settimeout(timeout)
    count = 0
    try:
        conn.connect(path)
        conn.sendall(READY)
        while True:
            data, fds, _, _ = socket.recv_fds(conn, _MAX_PACKET, 1)
            if not fds:
                return count   # DONE, or the old process went away
            sock = socket.socket(fileno=fds[0])
            try:
                adopt(sock, decode(data))
                count += 1
            except Exception:
                log.exception("could not adopt a client from the old process")
                sock.close()
    except OSError as exc:
        log.warning("client handoff from the old process ended: %s", exc)
        return count
    finally:
        conn.close()
