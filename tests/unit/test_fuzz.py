"""Fuzzing the frame reader, the wire decoders and the relay's handshake handling in
process (hypothesis drives tests/fuzz_harness.py), bounded in time. The live half, fuzzed
frames from many raw connections at a dvara process, is tests/integration/test_fuzz.py;
scripts/fuzz.py runs both for 100,000+ inputs.
"""

from __future__ import annotations

import os
import socket
import struct
import types
from typing import Iterator

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvara_lib import wire
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO, Fill
from dvara_lib.errors import ProtocolError
from dvara_lib.observe.metrics import Metrics
from tests.fuzz_harness import Mutator, RelayHarness, check_decoders, split_points

#: Examples per in-process property (FUZZ_EXAMPLES overrides; scripts/fuzz.py runs 100,000+).
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2500")), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])


_MEMBER = types.SimpleNamespace(proxy="127.0.0.1:6000", real="10.0.0.1:27017",
                                stats=Metrics().member("10.0.0.1:27017"))


@pytest.fixture(scope="module")
def harness() -> Iterator[RelayHarness]:
    h = RelayHarness()
    yield h
    try:
        h.check_bystander()
        h.check_no_leak()
    finally:
        h.close()


# -- in process ------------------------------------------------------------------------

@FUZZ
@given(st.randoms(use_true_random=True))
def test_relay_and_frame_reader_on_fuzzed_streams(harness, rng):
    """Hellos, legacy commands and writes, mutated and cut into pieces, on one client."""
    harness.run_input(rng, frames=rng.randrange(1, 6))
    if harness.inputs % 250 == 0:
        harness.check_bystander()


@FUZZ
@given(st.binary(max_size=300), st.randoms(use_true_random=True))
def test_frame_reader_on_raw_bytes(data, rng):
    """Any bytes, in any pieces: the same frames as a reference splitter, or ProtocolError
    once four bytes of a bad length have arrived; never another exception."""
    ours, theirs = socket.socketpair()
    client = ClientConn(ours, ("127.0.0.1", 1), _MEMBER, ClientIO(Budget(1 << 30), 0.5))
    try:
        got, sent, failed = [], 0, False
        for cut in split_points(rng, len(data)) if data else []:
            theirs.sendall(data[sent:cut])
            sent = cut
            while len(client.buf) + sum(map(len, got)) < sent:
                assert client.fill() is not Fill.CLOSED
            try:
                while (frame := client.next_frame()) is not None:
                    got.append(frame)
            except ProtocolError:
                failed = True
                break
        assert got == _reference(data[:sent])[0]
        assert failed == (_reference(data[:sent])[1] is not None)
    finally:
        client.close()
        theirs.close()


def _reference(data: bytes) -> tuple[list[bytes], object]:
    frames, pos = [], 0
    while pos + 4 <= len(data):
        length = struct.unpack_from("<i", data, pos)[0]
        if not 16 <= length <= 48_000_000:
            return frames, pos
        if pos + length > len(data):
            break
        frames.append(data[pos:pos + length])
        pos += length
    return frames, None


_OPCODES = st.sampled_from([wire.OP_MSG, wire.OP_QUERY, wire.OP_REPLY, wire.OP_COMPRESSED,
                            wire.OP_GET_MORE, wire.OP_INSERT, 0, -1])


@FUZZ
@given(_OPCODES, st.binary(max_size=120))
def test_wire_decoders_raise_only_protocol_error(op, body):
    """decompress, command_name, check_msg_flags, decode_*: ProtocolError or a result."""
    check_decoders(struct.pack("<iiii", 16 + len(body), 1, 2, op) + body)


@FUZZ
@given(st.sampled_from(sorted(wire.COMPRESSOR_IDS.values())), st.integers(-20, 400),
       st.binary(max_size=200))
def test_decompress_of_every_compressor_raises_only_protocol_error(compressor, size, payload):
    """Random payloads and claimed sizes reach each decompressor (snappy, zlib, zstd)."""
    frame = struct.pack("<iiiiiiB", 25 + len(payload), 1, 2, wire.OP_COMPRESSED, wire.OP_MSG,
                        size, compressor) + payload
    check_decoders(frame)


@FUZZ
@given(st.sampled_from(("snappy", "zlib", "zstd")), st.binary(max_size=300),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(-2, 2))
def test_decompress_of_damaged_real_payloads_raises_only_protocol_error(name, body, damage,
                                                                         size_delta):
    """Valid compressed frames of each compressor with bytes changed and the claimed size
    moved: a result of the claimed size, or ProtocolError."""
    frame = bytearray(wire.compress(wire.HEADER.pack(16 + len(body), 1, 2, wire.OP_MSG) + body,
                                    wire.COMPRESSOR_IDS[name]))
    for index, value in damage:
        frame[25 + index % max(1, len(frame) - 25)] = value
    struct.pack_into("<i", frame, 20, len(body) + size_delta)
    check_decoders(bytes(frame))
    try:
        inner, _ = wire.decompress(bytes(frame))
    except ProtocolError:
        return
    assert len(inner) == 16 + len(body) + size_delta


_MUTATOR = Mutator(bson.ObjectId(), 1)


@FUZZ
@given(st.randoms(use_true_random=True))
def test_wire_decoders_on_mutated_frames(rng):
    frame = _MUTATOR.frame(rng)
    if len(frame) >= 16:
        check_decoders(frame)


