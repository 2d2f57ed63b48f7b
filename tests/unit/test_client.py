"""Frame assembly of dvara_lib.proxy.client.ClientConn over a socketpair()."""

from __future__ import annotations

import socket
import struct
import threading
import time
import types
from typing import Iterator

import pytest

from dvara_lib import wire
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO, Fill
from dvara_lib.errors import ProtocolError
from dvara_lib.observe.metrics import Metrics

MEMBER = types.SimpleNamespace(proxy="127.0.0.1:40001", real="db1.example:27017",
                               stats=Metrics().member("db1.example:27017"))


@pytest.fixture
def pair() -> Iterator[tuple[ClientConn, socket.socket]]:
    """(a ClientConn, the peer socket playing the driver)."""
    ours, theirs = socket.socketpair()
    client = ClientConn(ours, ("127.0.0.1", 50000), MEMBER, ClientIO(Budget(1 << 30), 0.05))
    yield client, theirs
    client.close()
    theirs.close()


def frames(n: int) -> list[bytes]:
    return [wire.op_msg({"insert": "c", "documents": [{"i": i, "pad": "x" * i}], "$db": "d"})
            for i in range(n)]


def test_a_frame_delivered_in_pieces(pair):
    client, peer = pair
    [frame] = frames(1)
    for cut in (2, 4, 15, 16, 30, len(frame) - 1):
        assert client.next_frame() is None
        peer.sendall(frame[len(client.buf):cut])
        assert client.fill() is Fill.DRAINED
        assert len(client.buf) == cut
    assert client.next_frame() is None
    peer.sendall(frame[-1:])
    assert client.fill() is Fill.DRAINED
    assert client.next_frame() == frame
    assert client.buf == b"" and client.next_frame() is None


def test_two_frames_in_one_read(pair):
    client, peer = pair
    first, second, third = frames(3)
    peer.sendall(first + second + third[:10])
    assert client.fill() is Fill.DRAINED
    assert client.next_frame() == first
    assert client.next_frame() == second
    assert client.next_frame() is None
    peer.sendall(third[10:])
    assert client.fill() is Fill.DRAINED
    assert client.next_frame() == third
    assert client.next_frame() is None


@pytest.mark.parametrize("length", [0, 15, -1, wire.MAX_MESSAGE_SIZE + 1])
def test_a_bad_length_raises_protocol_error(pair, length):
    client, peer = pair
    peer.sendall(struct.pack("<i", length))
    assert client.fill() is Fill.DRAINED
    with pytest.raises(ProtocolError):
        client.next_frame()


def test_eof_makes_fill_closed(pair):
    """An end of stream that came with the data is seen in the same call."""
    client, peer = pair
    peer.sendall(frames(1)[0][:5])
    peer.close()
    assert client.fill() is Fill.CLOSED
    assert len(client.buf) == 5
    assert client.next_frame() is None


def test_fill_without_data_times_out_and_keeps_the_client(pair):
    client, peer = pair
    assert client.fill() is Fill.DRAINED
    assert client.buf == b""


def test_fill_updates_last_active(pair):
    client, peer = pair
    before = client.last_active
    peer.sendall(b"\x10")
    assert client.fill() is Fill.DRAINED
    assert client.last_active >= before


def test_send_and_close(pair):
    client, peer = pair
    reply = wire.op_reply([{"ok": 1.0}], resp_to=3)
    assert client.send(reply) is True
    assert wire.read_frame(peer) == reply
    peer.close()
    assert not all(client.send(reply * 100) for _ in range(50))
    client.close()
    client.close()
    assert client.closed and client.sock.fileno() == -1


def test_new_clients_get_distinct_ids_and_a_readable_repr(pair):
    client, _ = pair
    a, b = socket.socketpair()
    try:
        other = ClientConn(a, ("10.1.2.3", 1234), MEMBER, client.io)
        assert other.id > client.id
        assert other.peer_ip == "10.1.2.3"
        assert repr(other) == f"<client #{other.id} 10.1.2.3:1234 on 127.0.0.1:40001>"
        assert (tuple(other.compressors), other.parked, other.pinned, other.closed) == (
            (), None, None, False)
    finally:
        a.close()
        b.close()


def test_clients_share_a_fixed_set_of_ownership_locks(pair):
    """A lock per client would cost 88 bytes each: clients share the acceptor's few,
    neighbours on different ones."""
    client, _ = pair
    pairs = [socket.socketpair() for _ in range(150)]
    try:
        clients = [ClientConn(a, ("10.1.2.3", 1234), MEMBER, client.io) for a, _ in pairs]
        locks = {id(c.lock) for c in clients}
        assert len(locks) == len(client.io.locks) < len(clients)
        assert all(a.lock is not b.lock for a, b in zip(clients, clients[1:]))
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_reply_the_socket_takes_in_parts_arrives_whole(pair):
    """The first try writes part of a reply; the rest follows, nothing twice."""
    client, peer = pair
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.io.write_timeout = 5.0
    reply = wire.op_msg({"ok": 1.0, "pad": bytes(range(256)) * 200})   # ~50 KB
    got = bytearray()

    def read() -> None:
        peer.settimeout(5)
        while len(got) < len(reply):
            time.sleep(0.001)                       # a slow reader: the socket fills up
            got.extend(peer.recv(8192))

    reader = threading.Thread(target=read)
    reader.start()
    assert client.send(reply) is True
    reader.join(10)
    assert bytes(got) == reply
