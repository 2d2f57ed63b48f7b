"""A real Relay over one member whose pool connects to a scripted server on socketpairs
(tests/unit: the relay and the legacy half of it, in process)."""

from __future__ import annotations

import socket
import threading
from typing import Callable, Optional

from dvara_lib import wire
from dvara_lib.backend.pool import Pool
from dvara_lib.backend.topology import Member, Topology
from dvara_lib.config import parse_args
from dvara_lib.errors import ConnectionFailure, ProtocolError
from dvara_lib.observe.metrics import Metrics
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO
from dvara_lib.proxy.relay import Relay

REAL = "10.0.0.1:27017"
#: The server's answer to one request: the replies to send, or None to hang up.
Answer = Callable[[bytes], Optional[list[bytes]]]


def ok(frame: bytes) -> list[bytes]:
    """{ok: 1, n: 1} to a request that expects a reply (the same bytes every time)."""
    if not wire.expects_reply(frame):
        return []
    return [wire.op_msg({"ok": 1.0, "n": 1}, resp_to=wire.request_id(frame), req_id=7)]


class ScriptedServer:
    """Server connections for a pool: socketpairs whose far ends answer per ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.connects = 0
        self._threads: list[threading.Thread] = []

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.settimeout(2.0)
        theirs.settimeout(5.0)
        self.connects += 1
        thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return ours

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            while True:
                try:
                    frame = wire.read_frame(sock)
                except (ConnectionFailure, ProtocolError, OSError):
                    return
                self.received.append(frame)
                replies = self.answer(frame)
                if replies is None:
                    return
                for reply in replies:
                    sock.sendall(reply)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(5)
            assert not thread.is_alive()


class Rig:
    """A Relay over one modern member whose pool connects to a ScriptedServer."""

    def __init__(self, answer: Answer, *flags: str, wire_version: int = 17) -> None:
        self.settings = parse_args(["--addrs", REAL, "--message-timeout", "2s",
                                    "--pool-wait-timeout", "200ms", *flags], env={})
        self.server = ScriptedServer(answer)
        self.topology = Topology("rs")
        pool = Pool(REAL, self.server.connect, self.settings.max_connections)
        self.member = Member(REAL, "127.0.0.1:6000", 6000, pool, Metrics().member(REAL))
        self.topology.add(self.member)
        self.topology.update(self.member, {
            "ok": 1.0, "isWritablePrimary": True, "setName": "rs", "hosts": [REAL],
            "primary": REAL, "me": REAL, "maxWireVersion": wire_version, "minWireVersion": 0})
        self.failures: list[Member] = []
        self.state_changes: list[tuple[Member, bool]] = []
        #: Checked-out server connections at the moment each client write began.
        self.in_use_at_write: list[int] = []
        io = ClientIO(Budget(1 << 30), 2.0, tee=self)
        self.io = io
        self.relay = Relay(self.settings, self.topology, lambda c, v, p: None,
                           on_server_failure=self.failures.append,
                           on_state_change=lambda m, s: self.state_changes.append((m, s)))
        self.peers: list[tuple[ClientConn, socket.socket]] = []

    def write(self, data: bytes) -> None:      # the tee: called as a client write begins
        self.in_use_at_write.append(self.member.pool.in_use)

    def client(self) -> tuple[ClientConn, socket.socket]:
        ours, theirs = socket.socketpair()
        theirs.settimeout(2.0)
        client = ClientConn(ours, ("127.0.0.1", 50000), self.member, self.io)
        self.peers.append((client, theirs))
        return client, theirs

    def close(self) -> None:
        for client, theirs in self.peers:
            if client.pinned is not None:
                self.relay.release_pin(client, reusable=False)
            client.close()
            theirs.close()
        self.member.pool.close()
        self.server.join()
