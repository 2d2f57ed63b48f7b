"""A recording, compressing front for a server that speaks no compression (SecantusDB).

# design:
# SecantusDB negotiates no compressor and does not read OP_COMPRESSED, so to test
# --backend-compressors against a real server this relay plays the compressing half of a
# server: dvara connects to it (its address stands in for the server's, as
# ``FaultRelay(advertise=True)`` does it: the server's own address is rewritten, same
# length, in every reply), it agrees to the first compressor of a handshake's
# ``compression`` list that it accepts, adds that to the handshake reply, decompresses
# what dvara sends and compresses every reply (an exhaust stream's too) with the
# compressor of the request before it. Every frame that crosses between dvara and the
# relay is recorded as it was on the wire, per connection, with what the connection's
# handshake offered. One thread per direction of each connection; close() ends them all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Optional

from dvara_lib import wire
from dvara_lib.errors import ConnectionFailure, ProtocolError, ServerTimeout


class Link:
    """One connection dvara opened: what its handshake offered, and the frames as they
    crossed (``("in", frame)`` from dvara, ``("out", frame)`` to dvara)."""

    def __init__(self, down: socket.socket, up: socket.socket) -> None:
        self.down, self.up = down, up
        self.offered: Optional[list[str]] = None
        self.agreed: Optional[str] = None
        self.frames: list[tuple[str, bytes]] = []
        self.compressor: Optional[int] = None   # of the last request: its replies use it
        self.hello_id: Optional[int] = None
        self.lock = threading.Lock()

    def record(self, direction: str, frame: bytes) -> None:
        with self.lock:
            self.frames.append((direction, frame))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.frames)


class CompressingServer:
    """Listens on 127.0.0.1:port for dvara and forwards to target (a SecantusDB)."""

    def __init__(self, target: tuple[str, int], accepts: tuple[str, ...]) -> None:
        self.target = target
        self.accepts = accepts
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        old, new = f"{target[0]}:{target[1]}".encode(), f"127.0.0.1:{self.port}".encode()
        if len(old) != len(new):
            self._listener.close()
            raise AssertionError(f"cannot stand in for {old!r} as {new!r}: sizes differ")
        self._rewrite = (old, new)
        self.links: list[Link] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="compressing-server", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def all_links(self) -> list[Link]:
        with self._lock:
            return list(self.links)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for link in self.all_links():
            for sock in (link.down, link.up):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._listener.accept()
                up = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            down.settimeout(None)
            up.settimeout(None)
            link = Link(down, up)
            with self._lock:
                self.links.append(link)
            for pump in (self._from_dvara, self._from_server):
                threading.Thread(target=self._run, args=(pump, link), daemon=True).start()

    @staticmethod
    def _run(pump: Any, link: Link) -> None:
        try:
            while True:
                pump(link)
        except (ConnectionFailure, ServerTimeout, ProtocolError, OSError):
            for sock in (link.down, link.up):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _from_dvara(self, link: Link) -> None:
        frame = wire.read_frame(link.down)
        link.record("in", frame)
        link.compressor = None
        if wire.opcode(frame) == wire.OP_COMPRESSED:
            frame, link.compressor = wire.decompress(frame)
        if wire.command_name(frame) in ("isMaster", "ismaster", "hello"):
            offered = wire.reply_document(_as_reply_shape(frame)).get("compression")
            if isinstance(offered, list) and link.offered is None:
                link.offered = offered
                link.agreed = next((c for c in offered if c in self.accepts), None)
                link.hello_id = wire.request_id(frame)
        wire.send_all(link.up, frame)

    def _from_server(self, link: Link) -> None:
        reply = wire.read_frame(link.up).replace(*self._rewrite)
        if link.hello_id is not None and wire.response_to(reply) == link.hello_id:
            link.hello_id = None
            doc = wire.reply_document(reply)
            doc["compression"] = [link.agreed] if link.agreed else []
            reply = _reply_with(reply, doc)
        if link.compressor is not None:
            reply = wire.compress(reply, link.compressor)
        link.record("out", reply)
        wire.send_all(link.down, reply)


def _as_reply_shape(request: bytes) -> bytes:
    """A request's command document in a frame reply_document reads."""
    if wire.opcode(request) == wire.OP_MSG:
        return request
    return wire.op_reply([wire.decode_query(request)[4]], 0)


def _reply_with(reply: bytes, doc: dict[str, Any]) -> bytes:
    if wire.opcode(reply) == wire.OP_MSG:
        return wire.op_msg(doc, resp_to=wire.response_to(reply), req_id=wire.request_id(reply))
    return wire.op_reply([doc], wire.response_to(reply))
