"""Framing, cheap inspection, builders, OP_COMPRESSED and CRC-32C of dvara_lib.wire."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Iterator

import bson
import crc32c
import pytest
import snappy
import zstandard

from dvara_lib import wire
from dvara_lib.errors import ConnectionFailure, ProtocolError, ServerTimeout
from tests.helpers import ROOT

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def raw_frame(op: int, body: bytes, req_id: int = 7, resp_to: int = 0) -> bytes:
    return wire.HEADER.pack(16 + len(body), req_id, resp_to, op) + body


def msg_with_sections(flags: int, *sections: bytes, checksum: bool = False) -> bytes:
    """An OP_MSG from raw sections; with checksum, a valid CRC-32C is appended."""
    body = _U32.pack(flags) + b"".join(sections)
    if not checksum:
        return raw_frame(wire.OP_MSG, body)
    unsummed = raw_frame(wire.OP_MSG, body + b"\x00" * 4)[:-4]
    return unsummed + _U32.pack(wire.crc32c(unsummed))


def body_section(doc: dict) -> bytes:
    return b"\x00" + bson.encode(doc)


def sequence_section(identifier: str, docs: list[dict]) -> bytes:
    payload = identifier.encode() + b"\x00" + b"".join(bson.encode(d) for d in docs)
    return b"\x01" + _I32.pack(4 + len(payload)) + payload


def compressed(original_op: int, size: int, compressor: int, payload: bytes) -> bytes:
    return raw_frame(wire.OP_COMPRESSED, struct.pack("<iiB", original_op, size, compressor)
                     + payload)


# --- header and length bounds ----------------------------------------------------------

@pytest.mark.parametrize("length", [16, 17, 1024, wire.MAX_MESSAGE_SIZE])
def test_check_length_accepts_sizes_in_bounds(length):
    wire.check_length(length)


@pytest.mark.parametrize("length", [-1, 0, 15, wire.MAX_MESSAGE_SIZE + 1, 2**31 - 1])
def test_check_length_rejects_sizes_out_of_bounds(length):
    with pytest.raises(ProtocolError, match="outside"):
        wire.check_length(length)


def test_bounds_are_the_spec_values():
    assert (wire.MIN_MESSAGE_SIZE, wire.MAX_MESSAGE_SIZE) == (16, 48_000_000)


def test_header_accessors():
    frame = raw_frame(wire.OP_QUERY, b"", req_id=11, resp_to=22)
    assert (wire.opcode(frame), wire.request_id(frame), wire.response_to(frame)) == (
        wire.OP_QUERY, 11, 22)


def test_next_request_id_is_a_positive_int32():
    ids = [wire.next_request_id() for _ in range(1000)]
    assert all(0 < i <= 0x7FFFFFFF for i in ids)
    assert len(set(ids)) > 990


# --- command_name ------------------------------------------------------------------------

def test_command_name_of_op_msg_with_body_first():
    frame = wire.op_msg({"find": "coll", "filter": {}, "$db": "test"})
    assert wire.command_name(frame) == "find"


def test_command_name_of_op_msg_with_a_document_sequence_before_the_body():
    frame = msg_with_sections(
        0, sequence_section("documents", [{"_id": 1}, {"_id": 2}]),
        body_section({"insert": "coll", "$db": "test"}))
    assert wire.command_name(frame) == "insert"
    assert wire.decode_msg_body(frame) == {"insert": "coll", "$db": "test"}


def test_command_name_of_checksummed_op_msg_ignores_the_checksum():
    frame = msg_with_sections(wire.CHECKSUM_PRESENT, body_section({"ping": 1, "$db": "a"}),
                              checksum=True)
    assert wire.command_name(frame) == "ping"


def test_command_name_of_op_msg_with_an_empty_body():
    assert wire.command_name(wire.op_msg({})) == ""


@pytest.mark.parametrize("sections, error", [
    ((sequence_section("documents", [{"a": 1}]),), "no body"),
    ((b"\x02" + bson.encode({"a": 1}),), "section kind 2"),
    ((b"\x01" + _I32.pack(3) + b"abc",), "section size"),
])
def test_command_name_of_malformed_op_msg_raises(sections, error):
    with pytest.raises(ProtocolError, match=error):
        wire.command_name(msg_with_sections(0, *sections))


def test_command_name_of_op_query_on_cmd_collection():
    assert wire.command_name(wire.op_query("admin.$cmd", {"isMaster": 1})) == "isMaster"


def test_command_name_of_query_wrapped_op_query_command():
    doc = {"$query": {"ismaster": 1, "helloOk": True},
           "$readPreference": {"mode": "secondaryPreferred"}}
    frame = wire.op_query("admin.$cmd", doc)
    assert wire.command_name(frame) == "ismaster"
    assert wire.decode_query(frame)[4] == {"ismaster": 1, "helloOk": True}


def test_command_name_of_ordinary_op_query_is_none():
    assert wire.command_name(wire.op_query("test.coll", {"isMaster": 1})) is None


@pytest.mark.parametrize("op", [wire.OP_REPLY, wire.OP_INSERT, wire.OP_UPDATE, wire.OP_DELETE,
                                wire.OP_GET_MORE, wire.OP_KILL_CURSORS])
def test_command_name_of_other_opcodes_is_none(op):
    assert wire.command_name(raw_frame(op, b"\x00" * 8)) is None


# --- expects_reply / more_to_come --------------------------------------------------------

@pytest.mark.parametrize("op, expected", [
    (wire.OP_QUERY, True), (wire.OP_GET_MORE, True),
    (wire.OP_INSERT, False), (wire.OP_UPDATE, False), (wire.OP_DELETE, False),
    (wire.OP_KILL_CURSORS, False), (wire.OP_REPLY, False),
])
def test_expects_reply_of_legacy_opcodes(op, expected):
    frame = raw_frame(op, b"\x00" * 20)
    assert wire.expects_reply(frame) is expected
    assert wire.more_to_come(frame) is False


@pytest.mark.parametrize("flags, expected", [
    (0, True), (wire.EXHAUST_ALLOWED, True), (wire.CHECKSUM_PRESENT, True),
    (wire.MORE_TO_COME, False), (wire.MORE_TO_COME | wire.EXHAUST_ALLOWED, False),
])
def test_expects_reply_of_op_msg_follows_more_to_come(flags, expected):
    frame = wire.op_msg({"insert": "c", "$db": "d"}, flags=flags)
    assert wire.expects_reply(frame) is expected
    assert wire.more_to_come(frame) is (not expected)


def test_opcode_sets():
    assert wire.NO_REPLY_OPCODES == {wire.OP_UPDATE, wire.OP_INSERT, wire.OP_DELETE,
                                     wire.OP_KILL_CURSORS}
    assert wire.REPLY_OPCODES == {wire.OP_QUERY, wire.OP_GET_MORE}
    assert wire.OP_REPLY not in wire.KNOWN_REQUEST_OPCODES
    assert {wire.OP_MSG, wire.OP_COMPRESSED} <= wire.KNOWN_REQUEST_OPCODES


# --- OP_MSG flags and CRC-32C --------------------------------------------------------------

@pytest.mark.parametrize("data, crc", [
    (b"123456789", 0xE3069283), (b"", 0), (b"\x00" * 32, 0x8A9136AA),
])
def test_crc32c_known_values(data, crc):
    assert wire.crc32c(data) == crc


# RFC 3720 (iSCSI) B.4 CRC-32C examples, and the check value of the CRC catalogue.
@pytest.mark.parametrize("data, crc", [
    (b"123456789", 0xE3069283), (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E), (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_the_crc32c_package_agrees_with_known_vectors(data, crc):
    assert crc32c.crc32c(data) == crc
    assert wire.crc32c(data) == crc
    assert wire.crc32c(bytearray(data)) == crc


@pytest.mark.parametrize("flags", [0, wire.CHECKSUM_PRESENT, wire.MORE_TO_COME,
                                   wire.EXHAUST_ALLOWED,
                                   wire.MORE_TO_COME | wire.EXHAUST_ALLOWED])
def test_check_msg_flags_passes_known_flags_unchanged(flags):
    frame = msg_with_sections(flags, body_section({"ping": 1}),
                              checksum=bool(flags & wire.CHECKSUM_PRESENT))
    assert wire.check_msg_flags(frame) is frame


@pytest.mark.parametrize("unknown", [1 << 17, 1 << 20, 1 << 31, (1 << 20) | (1 << 30)])
def test_check_msg_flags_clears_unknown_optional_bits(unknown):
    frame = wire.op_msg({"ping": 1}, flags=wire.EXHAUST_ALLOWED | unknown, req_id=5)
    out = wire.check_msg_flags(frame)
    assert wire.msg_flags(out) == wire.EXHAUST_ALLOWED
    assert len(out) == len(frame) and out[20:] == frame[20:] and out[:16] == frame[:16]
    assert wire.decode_msg_body(out) == {"ping": 1}


@pytest.mark.parametrize("bit", [1 << 2, 1 << 5, 1 << 15])
def test_check_msg_flags_rejects_unknown_required_bits(bit):
    frame = wire.op_msg({"ping": 1}, flags=bit | (1 << 20))
    with pytest.raises(ProtocolError, match="required"):
        wire.check_msg_flags(frame)


def test_check_msg_flags_recomputes_the_checksum_of_a_changed_message():
    frame = msg_with_sections(wire.CHECKSUM_PRESENT | (1 << 20),
                              body_section({"find": "c", "$db": "d"}), checksum=True)
    out = wire.check_msg_flags(frame)
    assert wire.msg_flags(out) == wire.CHECKSUM_PRESENT
    assert len(out) == len(frame) == _I32.unpack_from(out, 0)[0]
    new_crc = _U32.unpack_from(out, len(out) - 4)[0]
    assert new_crc == wire.crc32c(out[:-4])
    assert new_crc != _U32.unpack_from(frame, len(frame) - 4)[0]
    assert wire.command_name(out) == "find"


# --- OP_COMPRESSED -------------------------------------------------------------------------

COMPRESSORS = ("zlib", "snappy", "zstd")
_PING_BODY = b"\x00\x00\x00\x00\x00" + bson.encode({"ping": 1})


def raw_compress(name: str, data: bytes) -> bytes:
    """data compressed as OP_COMPRESSED carries it, by the libraries themselves."""
    if name == "zlib":
        return zlib.compress(data)
    if name == "snappy":
        return snappy.compress(data)
    return zstandard.ZstdCompressor().compress(data)


def test_every_compressor_is_supported_here():
    assert wire.SUPPORTED_COMPRESSORS == ("snappy", "zstd", "zlib")


@pytest.mark.parametrize("name", COMPRESSORS)
def test_round_trip_keeps_header_ids(name):
    frame = wire.op_msg({"insert": "c", "documents": [{"x": "y" * 500}], "$db": "d"},
                        resp_to=55, req_id=77)
    cid = wire.COMPRESSOR_IDS[name]
    out = wire.compress(frame, cid)
    assert wire.opcode(out) == wire.OP_COMPRESSED
    assert (wire.request_id(out), wire.response_to(out)) == (77, 55)
    assert _I32.unpack_from(out, 0)[0] == len(out) < len(frame)
    assert struct.unpack_from("<iiB", out, 16) == (wire.OP_MSG, len(frame) - 16, cid)
    assert wire.decompress(out) == (frame, cid)


def test_the_payloads_are_what_the_spec_says():
    """snappy: a raw block (no stream framing); zstd: one zstd frame; zlib: a zlib stream."""
    frame = wire.op_msg({"ping": 1, "pad": "z" * 1000, "$db": "admin"})
    body = frame[16:]
    payload = {name: wire.compress(frame, wire.COMPRESSOR_IDS[name])[25:] for name in COMPRESSORS}
    assert snappy.uncompress(payload["snappy"]) == body
    assert wire.snappy_length(memoryview(payload["snappy"])) == len(body)
    assert zstandard.frame_content_size(payload["zstd"]) == len(body)
    assert zstandard.ZstdDecompressor().decompress(payload["zstd"]) == body
    assert zlib.decompress(payload["zlib"]) == body


def test_noop_compressor_round_trip():
    frame = wire.op_query("admin.$cmd", {"isMaster": 1}, req_id=9)
    out = wire.compress(frame, wire.COMPRESSOR_IDS["noop"])
    assert out[25:] == frame[16:]
    assert wire.request_id(out) == 9
    assert wire.decompress(out) == (frame, 0)


@pytest.mark.parametrize("compressor", [4, 255])
def test_decompress_rejects_unknown_compressors(compressor):
    with pytest.raises(ProtocolError, match=f"compressor id {compressor}"):
        wire.decompress(compressed(wire.OP_MSG, 5, compressor, b"\x00" * 5))


def test_without_the_libraries_only_zlib_is_offered_and_the_others_are_refused():
    """A real interpreter where snappy and zstandard cannot be imported."""
    code = ("import sys; sys.modules['snappy'] = None; sys.modules['zstandard'] = None\n"
            "from dvara_lib import wire\n"
            "print(wire.SUPPORTED_COMPRESSORS)\n"
            "for cid in (1, 3):\n"
            "    try: wire.decompress(wire.compress(wire.op_msg({'ping': 1}), 0)[:24]"
            " + bytes([cid]) + b'x' * 20)\n"
            "    except wire.ProtocolError as exc: print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert out == ["('zlib',)", "unsupported compressor id 1", "unsupported compressor id 3"]


@pytest.mark.parametrize("name", ("noop", *COMPRESSORS))
@pytest.mark.parametrize("delta", [-1, 1, 100])
def test_decompress_rejects_a_wrong_uncompressed_size(name, delta):
    data = _PING_BODY if name == "noop" else raw_compress(name, _PING_BODY)
    with pytest.raises(ProtocolError, match="says"):
        wire.decompress(compressed(wire.OP_MSG, len(_PING_BODY) + delta,
                                   wire.COMPRESSOR_IDS[name], data))


@pytest.mark.parametrize("name", COMPRESSORS)
def test_a_decompression_bomb_is_refused_without_inflating_it(name):
    """20 MB of zeros, compressed to a few kB, claimed as 100 bytes."""
    bomb = raw_compress(name, bytes(20_000_000))
    assert len(bomb) < 1_000_000
    with pytest.raises(ProtocolError, match="says|zstd"):
        wire.decompress(compressed(wire.OP_MSG, 100, wire.COMPRESSOR_IDS[name], bomb))


def test_a_zstd_frame_without_its_size_is_bounded_by_the_claimed_size():
    body = bytes(50_000)
    data = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    assert zstandard.frame_content_size(data) == -1
    ok = compressed(wire.OP_MSG, len(body), 3, data)
    assert wire.decompress(ok)[0][16:] == body
    with pytest.raises(ProtocolError, match="zstd"):
        wire.decompress(compressed(wire.OP_MSG, 1000, 3, data))


@pytest.mark.parametrize("name, data", [
    ("snappy", b""), ("snappy", b"\xff\xff\xff\xff\xff\xff"), ("snappy", b"\x0a garbage!"),
    ("zstd", b""), ("zstd", b"not a zstd frame"),
    ("zstd", zstandard.ZstdCompressor().compress(b"x" * 10)[:-3]),
    ("zstd", zstandard.ZstdCompressor().compress(b"x" * 10) + b"extra"),
    ("zlib", b"not zlib at all")])
def test_decompress_rejects_bad_data(name, data):
    with pytest.raises(ProtocolError, match=f"{name}|says"):
        wire.decompress(compressed(wire.OP_MSG, 10, wire.COMPRESSOR_IDS[name], data))


@pytest.mark.parametrize("size", [-17, wire.MAX_MESSAGE_SIZE])
def test_decompress_rejects_sizes_out_of_bounds(size):
    with pytest.raises(ProtocolError, match="outside"):
        wire.decompress(compressed(wire.OP_MSG, size, 0, b"\x00" * 5))


def test_decompress_rejects_truncation_and_nesting():
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decompress(compressed(wire.OP_MSG, 10, 0, b"")[:24])
    with pytest.raises(ProtocolError, match="nested"):
        wire.decompress(compressed(wire.OP_COMPRESSED, 4, 0, b"\x00" * 4))


# --- decoders ------------------------------------------------------------------------------

def test_decode_reply_rejects_a_count_mismatch():
    frame = bytearray(wire.op_reply([{"a": 1}], resp_to=3))
    struct.pack_into("<i", frame, 32, 2)
    with pytest.raises(ProtocolError, match="says 2 documents, holds 1"):
        wire.decode_reply(bytes(frame))


def test_decode_reply_rejects_bad_bson():
    frame = wire.op_reply([{"a": 1}], resp_to=3)
    with pytest.raises(ProtocolError, match="bad OP_REPLY"):
        wire.decode_reply(frame[:-2])


def test_reply_document_of_an_empty_op_reply_raises():
    with pytest.raises(ProtocolError, match="no document"):
        wire.reply_document(wire.op_reply([], resp_to=1))


def test_decode_msg_body_rejects_bad_bson():
    frame = wire.op_msg({"a": 1})
    with pytest.raises(ProtocolError, match="bad OP_MSG body"):
        wire.decode_msg_body(frame[:-1])


# --- builders round-trip -------------------------------------------------------------------

def test_op_msg_round_trip():
    doc = {"find": "c", "filter": {"x": {"$gt": 1}}, "$db": "d"}
    frame = wire.op_msg(doc, resp_to=4, flags=wire.EXHAUST_ALLOWED, req_id=12)
    assert _I32.unpack_from(frame, 0)[0] == len(frame)
    assert (wire.opcode(frame), wire.request_id(frame), wire.response_to(frame)) == (
        wire.OP_MSG, 12, 4)
    assert wire.msg_flags(frame) == wire.EXHAUST_ALLOWED
    assert wire.decode_msg_body(frame) == doc
    assert wire.reply_document(frame) == doc


def test_op_msg_assigns_request_ids():
    frames = [wire.op_msg({"ping": 1}) for _ in range(100)]
    assert all(wire.request_id(f) > 0 for f in frames)
    assert len({wire.request_id(f) for f in frames}) > 95


def test_op_reply_round_trip():
    docs = [{"a": 1}, {"b": "two"}, {}]
    frame = wire.op_reply(docs, resp_to=99, flags=wire.REPLY_QUERY_FAILURE, cursor_id=2**40,
                          starting=3)
    assert _I32.unpack_from(frame, 0)[0] == len(frame)
    assert (wire.opcode(frame), wire.response_to(frame)) == (wire.OP_REPLY, 99)
    assert wire.decode_reply(frame) == (wire.REPLY_QUERY_FAILURE, 2**40, 3, docs)
    assert wire.reply_document(frame) == {"a": 1}


def test_op_query_round_trip():
    frame = wire.op_query("admin.$cmd", {"isMaster": 1}, number_to_return=-1, flags=4,
                          req_id=31)
    assert _I32.unpack_from(frame, 0)[0] == len(frame)
    assert (wire.opcode(frame), wire.request_id(frame), wire.response_to(frame)) == (
        wire.OP_QUERY, 31, 0)
    assert wire.decode_query(frame) == (4, "admin.$cmd", 0, -1, {"isMaster": 1})


def test_reply_like_answers_op_msg_with_op_msg():
    request = wire.op_msg({"hello": 1, "$db": "admin"}, req_id=41)
    reply = wire.reply_like(request, {"ok": 1.0}, flags=wire.MORE_TO_COME)
    assert (wire.opcode(reply), wire.response_to(reply)) == (wire.OP_MSG, 41)
    assert wire.msg_flags(reply) == wire.MORE_TO_COME
    assert wire.reply_document(reply) == {"ok": 1.0}


def test_reply_like_answers_op_query_with_op_reply():
    request = wire.op_query("admin.$cmd", {"isMaster": 1}, req_id=42)
    reply = wire.reply_like(request, {"ok": 1.0})
    assert (wire.opcode(reply), wire.response_to(reply)) == (wire.OP_REPLY, 42)
    assert wire.decode_reply(reply) == (0, 0, 0, [{"ok": 1.0}])


def test_with_request_id_changes_only_request_id():
    frame = wire.op_msg({"ping": 1}, resp_to=1, req_id=2)
    out = wire.with_request_id(frame, 1234)
    assert (wire.request_id(out), wire.response_to(out)) == (1234, 1)
    assert out[:4] == frame[:4] and out[8:] == frame[8:]


def test_iter_frames_splits_back_to_back_frames():
    frames = [wire.op_msg({"a": 1}), wire.op_reply([{"b": 2}], 1), wire.op_query("x.$cmd", {})]
    assert list(wire.iter_frames(b"".join(frames))) == frames
    with pytest.raises(ProtocolError):
        list(wire.iter_frames(_I32.pack(15) + b"\x00" * 11))


# --- read_frame over a socket --------------------------------------------------------------

def test_read_frame_of_a_whole_message(pair):
    a, b = pair
    frame = wire.op_msg({"ping": 1, "$db": "admin"})
    wire.send_all(a, frame)
    assert wire.read_frame(b) == frame


def test_read_frame_assembles_a_message_sent_in_many_pieces(pair):
    a, b = pair
    frame = wire.op_msg({"insert": "c", "documents": [{"i": i} for i in range(10)], "$db": "d"})
    pieces = [frame[i:i + 3] for i in range(0, len(frame), 3)]

    def send_slowly() -> None:
        for piece in pieces:
            a.sendall(piece)
            time.sleep(0.0005)

    sender = threading.Thread(target=send_slowly, daemon=True)
    sender.start()
    b.settimeout(5)
    try:
        assert wire.read_frame(b) == frame
    finally:
        sender.join(5)


def test_read_frame_reads_one_message_at_a_time(pair):
    a, b = pair
    first, second = wire.op_msg({"a": 1}), wire.op_reply([{"b": 2}], 7)
    a.sendall(first + second)
    assert wire.read_frame(b) == first
    assert wire.read_frame(b) == second


@pytest.mark.parametrize("cut", [0, 3, 16, 20])
def test_read_frame_raises_connection_failure_on_eof(pair, cut):
    a, b = pair
    a.sendall(wire.op_msg({"ping": 1})[:cut])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionFailure, match="closed"):
        wire.read_frame(b)


@pytest.mark.parametrize("length", [15, 0, -5, wire.MAX_MESSAGE_SIZE + 1])
def test_read_frame_rejects_a_bad_length(pair, length):
    a, b = pair
    a.sendall(wire.HEADER.pack(length, 1, 0, wire.OP_MSG))
    with pytest.raises(ProtocolError):
        wire.read_frame(b)


def test_read_frame_times_out_as_server_timeout(pair):
    a, b = pair
    b.settimeout(0.05)
    a.sendall(wire.op_msg({"ping": 1})[:10])
    with pytest.raises(ServerTimeout):
        wire.read_frame(b)


def test_send_all_to_a_closed_peer_raises_connection_failure(pair):
    a, b = pair
    b.close()
    with pytest.raises(ConnectionFailure, match="write failed"):
        for _ in range(100):
            wire.send_all(a, wire.op_msg({"x": "y" * 10000}))
