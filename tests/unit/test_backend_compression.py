"""--backend-compressors: the handshake's offer, the server's choice, and the pooled
connection that compresses what it sends and decompresses what it reads (on socketpairs)."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest

from dvara_lib import wire
from dvara_lib.backend.connect import agreed_compressor, hello_request
from dvara_lib.backend.pool import (Compressed, CompressedConnection, ServerConnection,
                                    new_connection)
from dvara_lib.errors import ProtocolError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_the_first_handshake_offers_the_compressors_and_later_hellos_do_not():
    first = wire.decode_query(hello_request(17, True, "1.0", ("zstd", "zlib")))[4]
    assert first["compression"] == ["zstd", "zlib"] and first["client"]["driver"]["name"] == "dvara"
    assert "compression" not in wire.decode_query(hello_request(17, True, "1.0"))[4]
    assert "compression" not in wire.decode_msg_body(hello_request(17, False, "1.0", ("zlib",)))


@pytest.mark.parametrize("listed, offered, agreed", [
    (["zstd", "zlib"], ("snappy", "zstd", "zlib"), "zstd"),
    (["zlib"], ("snappy", "zlib"), "zlib"),
    (["lz4", "snappy"], ("zlib", "snappy"), "snappy"),
    ([], ("zlib",), None),
    (None, ("zlib",), None),
    ("zlib", ("zlib",), None),
    (["zlib"], (), None),
])
def test_the_server_picks_among_what_was_offered(listed, offered, agreed):
    hello = {"ok": 1.0} if listed is None else {"ok": 1.0, "compression": listed}
    expected = None if agreed is None else wire.COMPRESSOR_IDS[agreed]
    assert agreed_compressor(hello, offered) == expected


def test_a_plain_socket_makes_a_plain_connection(pair):
    assert type(new_connection(pair[0], 0)) is ServerConnection
    conn = new_connection(Compressed(pair[0], 3), 0)
    assert isinstance(conn, CompressedConnection) and conn.compressor == 3


@pytest.mark.parametrize("name", ["snappy", "zstd", "zlib"])
def test_commands_go_compressed_and_replies_come_back_plain(pair, name):
    cid = wire.COMPRESSOR_IDS[name]
    conn = new_connection(Compressed(pair[0], cid), 0)
    request = wire.op_msg({"find": "c", "filter": {"s": "x" * 300}, "$db": "d"})
    conn.send(request)
    sent = wire.read_frame(pair[1])
    assert wire.opcode(sent) == wire.OP_COMPRESSED and wire.decompress(sent) == (request, cid)
    reply = wire.op_msg({"ok": 1.0, "pad": "y" * 300}, resp_to=wire.request_id(request))
    pair[1].sendall(wire.compress(reply, cid) + reply)     # a compressed one, then a plain one
    assert conn.read_frame() == reply
    assert conn.read_frame() == reply


@pytest.mark.parametrize("doc", [{"saslStart": 1, "$db": "admin"},
                                 {"saslContinue": 1, "$db": "admin"},
                                 {"hello": 1, "$db": "admin"}])
def test_what_the_spec_keeps_plain_goes_plain(pair, doc):
    conn = new_connection(Compressed(pair[0], wire.COMPRESSOR_IDS["zlib"]), 0)
    request = wire.op_msg(doc)
    conn.send(request)
    assert wire.read_frame(pair[1]) == request


def test_a_bad_compressed_reply_is_a_protocol_error(pair):
    conn = new_connection(Compressed(pair[0], wire.COMPRESSOR_IDS["snappy"]), 0)
    bomb = wire.compress(wire.op_msg({"x": "z" * 10_000}), wire.COMPRESSOR_IDS["snappy"])
    forged = bytearray(bomb)
    wire.INT32.pack_into(forged, 20, 100)       # claims 100 bytes
    pair[1].sendall(bytes(forged))
    with pytest.raises(ProtocolError, match="says"):
        conn.read_frame()
