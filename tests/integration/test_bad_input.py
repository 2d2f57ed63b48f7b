"""Bad frames close only the client that sent them; everyone else keeps working."""

from __future__ import annotations

import struct

import pytest
from pymongo import MongoClient

from dvara_lib import wire
from tests.helpers import RawClient


@pytest.fixture(scope="module")
def proxy(secantus, tmp_path_factory):
    from tests.helpers import Dvara
    proxy = Dvara(tmp_path_factory.mktemp("dvara"), secantus.address)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def bystander(proxy):
    client = MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000)
    client.bad.c.insert_one({"before": True})
    yield client
    client.close()


def _header(length: int, op: int = wire.OP_MSG) -> bytes:
    return struct.pack("<iiii", length, 1, 0, op)


BAD_FRAMES = {
    "length under 16": _header(8),
    "negative length": _header(-5),
    "length over 48 MB": _header(48_000_001),
    "http garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown opcode": _header(20, 9999) + b"\x00" * 4,
    "reply opcode from a client": _header(36, wire.OP_REPLY) + b"\x00" * 20,
    "op_msg with no body": _header(21) + b"\x00\x00\x00\x00\x09",
    "op_msg unknown required flag": _header(26) + struct.pack("<I", 1 << 5) + b"\x00"
    + b"\x05\x00\x00\x00\x00",
    "hello with broken bson": _header(38) + b"\x00\x00\x00\x00\x00" + b"\x11\x00\x00\x00"
    + b"\x10hello\x00\x01\x00\x00\x00\xff\xff\xff\xff\xff",
    "bad zlib": struct.pack("<iiii", 30, 1, 0, wire.OP_COMPRESSED)
    + struct.pack("<iiB", wire.OP_MSG, 50, 2) + b"notzlib!!",
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frame_closes_only_that_client(name, proxy, bystander):
    bad = RawClient(proxy.port)
    bad.send(BAD_FRAMES[name])
    assert bad.closed_by_peer(timeout=10), f"{name}: the proxy did not close the client"
    bad.close()
    assert bystander.admin.command("ping")["ok"] == 1.0
    assert bystander.bad.c.count_documents({"before": True}) == 1
    assert proxy.proc.poll() is None


def test_truncated_message_then_close(proxy, bystander):
    for cut in (3, 16, 30):
        frame = wire.op_msg({"insert": "c", "documents": [{"truncated": True}], "$db": "bad"})
        half = RawClient(proxy.port)
        half.send(frame[:cut])
        half.close()
    assert bystander.admin.command("ping")["ok"] == 1.0
    assert bystander.bad.c.count_documents({"truncated": True}) == 0


def test_unknown_optional_flag_bits_are_cleared(proxy):
    raw = RawClient(proxy.port)
    raw.send(wire.op_msg({"ping": 1, "$db": "admin"}, flags=1 << 20))
    assert wire.reply_document(raw.recv_frame())["ok"] == 1.0
    raw.close()


def test_legacy_op_query_isMaster_and_compressed_ping(proxy, secantus):
    raw = RawClient(proxy.port)
    reply = raw.legacy_command({"isMaster": 1, "compression": ["lz4", "snappy", "zlib"]})
    assert reply["ismaster"] is True and reply["compression"] == ["snappy", "zlib"]
    assert secantus.address not in repr(reply)
    ping = wire.op_msg({"ping": 1, "$db": "admin"})
    raw.send(wire.compress(ping, wire.COMPRESSOR_IDS["zlib"]))
    answer = raw.recv_frame()
    assert wire.opcode(answer) == wire.OP_COMPRESSED
    inner, compressor = wire.decompress(answer)
    assert compressor == wire.COMPRESSOR_IDS["zlib"]
    assert wire.response_to(inner) == wire.request_id(ping)
    assert wire.decode_msg_body(inner)["ok"] == 1.0
    raw.close()
