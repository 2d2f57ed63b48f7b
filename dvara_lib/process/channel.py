"""The control channel between the dvara parent and one worker process.

A unix SOCK_SEQPACKET socketpair: each packet is one pickled dict (the message), with
file descriptors (listeners, client sockets) passed alongside by SCM_RIGHTS. Both ends
are dvara's own processes, so the pickles are trusted. ``request`` sends a message
with an id and waits for the reply with the same id; the reader thread of the end that
asked hands replies over with ``answered``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import pickle
import select
import socket
import threading
from typing import Any, Optional, Sequence

log = logging.getLogger("dvara.channel")

#: Largest message (metrics replies are the big ones); both buffers are set to hold it.
MAX_MESSAGE = 8 * 1024 * 1024
_MAX_FDS = 4


class ChannelClosed(Exception):
    """The other end went away."""


class Channel:
    """One end. Methods: send, recv, request, answered, close. Thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}

    @classmethod
    def pair(cls) -> tuple["Channel", socket.socket]:
        """(this process's end, the socket to pass to the child)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Can raise ChannelClosed."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                socket.send_fds(self.sock, [data], list(fds))
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def recv(self, timeout: Optional[float] = None) -> Optional[tuple[dict[str, Any], list[int]]]:
        """The next message and the descriptors that came with it, or None if none came
        within timeout. Can raise ChannelClosed."""
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            return None
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, _MAX_FDS)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not data:
            for fd in fds:
                socket.close(fd)
            raise ChannelClosed("the other end closed the channel")
        return pickle.loads(data), fds

    def request(self, message: dict[str, Any], timeout: float) -> Optional[dict[str, Any]]:
        """Send message and wait for its reply (None if none came in time)."""
        rid = next(self._ids)
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._waiting[rid] = future
        try:
            self.send({**message, "id": rid})
            return future.result(timeout)
        except (ChannelClosed, concurrent.futures.TimeoutError):
            return None
        finally:
            self._waiting.pop(rid, None)

    def answered(self, message: dict[str, Any]) -> bool:
        """Hand a reply to the request waiting for it; False if message is no reply."""
        future = self._waiting.get(message.get("reply_to", 0))
        if future is None:
            return False
        future.set_result(message)
        return True

    def reply(self, request: dict[str, Any], **answer: Any) -> None:
        self.send({"op": "reply", "reply_to": request["id"], **answer})

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
