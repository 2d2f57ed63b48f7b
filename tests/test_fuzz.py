"""Fuzzing the frame reader, the wire decoders and the handshake handling, bounded in time.

In process (hypothesis drives tests/fuzz_harness.py), then live: fuzzed frames from many
raw connections at a dvara process. scripts/fuzz.py runs the same for 100,000+ inputs.
"""

from __future__ import annotations

import math
import os
import random
import socket
import struct
import time
import types
from typing import Iterator

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from dvara_lib import wire
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO, Fill
from dvara_lib.errors import ProtocolError
from dvara_lib.observe.metrics import Metrics
from tests.fuzz_harness import (Mutator, RelayHarness, check_decoders, split_points,
                                throw_frames)
from tests.helpers import Dvara, RawClient, wait_until

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


_MUTATOR = Mutator(bson.ObjectId(), 1)


@FUZZ
@given(st.randoms(use_true_random=True))
def test_wire_decoders_on_mutated_frames(rng):
    frame = _MUTATOR.frame(rng)
    if len(frame) >= 16:
        check_decoders(frame)


# -- live ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxy(secantus, tmp_path_factory):
    proxy = Dvara(tmp_path_factory.mktemp("fuzz"), secantus.address, "--message-timeout",
                  "2s", "--max-connections", "4")
    yield proxy
    proxy.stop()


def _topology_version(port: int) -> dict:
    client = RawClient(port)
    try:
        return client.command({"hello": 1})["topologyVersion"]
    finally:
        client.close()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_live_dvara_survives_fuzzed_frames(proxy):
    with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
        client.fuzz.c.insert_one({"_id": "before"})
    fds = _open_fds(proxy.pid)
    tv = _topology_version(proxy.port)
    mutator = Mutator(tv["processId"], tv["counter"])
    stats = throw_frames(proxy.port, mutator, seed=random.randrange(2 ** 32), frames=3000,
                         connections=16, deadline=time.monotonic() + 40)
    assert stats.frames >= 2500, stats
    assert proxy.proc.poll() is None, proxy.log()[-3000:]
    with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
        client.fuzz.c.insert_one({"_id": "after"})
        assert client.fuzz.c.find_one({"_id": "before"}) == {"_id": "before"}
        assert client.fuzz.c.find_one({"_id": "after"}) == {"_id": "after"}
    log = proxy.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-5000:]
    assert "closing" in log          # the offending clients were closed
    # Every fuzzing client's socket is closed again (the pool may hold up to 4 more).
    wait_until(lambda: _open_fds(proxy.pid) <= fds + 4, "dvara to close the fuzzing clients")


def test_nan_max_await_does_not_stall_other_hellos(proxy):
    """Regression: an exhaust hello with maxAwaitTimeMS NaN was parked with a NaN
    deadline, which sat at the head of the deadline heap and never came due, so no
    other parked hello was ever answered at its time."""
    bad = RawClient(proxy.port)
    bad.send(wire.op_msg({"hello": 1, "maxAwaitTimeMS": math.nan, "$db": "admin"},
                         flags=wire.EXHAUST_ALLOWED))
    assert wire.decode_msg_body(bad.recv_frame())["ok"] == 1.0
    good = RawClient(proxy.port, timeout=5)
    tv = good.command({"hello": 1})["topologyVersion"]
    start = time.monotonic()
    good.send(wire.op_msg({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 300,
                           "$db": "admin"}))
    assert wire.decode_msg_body(good.recv_frame())["ok"] == 1.0
    assert time.monotonic() - start < 2.0
    bad.close()
    good.close()


SHORT_FRAMES = {
    "OP_MSG of 16 bytes": struct.pack("<iiii", 16, 1, 0, wire.OP_MSG),
    "OP_MSG of 19 bytes": struct.pack("<iiii", 19, 1, 0, wire.OP_MSG) + b"\x00" * 3,
    "OP_MSG kind-1 section cut": struct.pack("<iiii", 23, 1, 0, wire.OP_MSG)
    + b"\x00\x00\x00\x00\x01\x05\x00",
    "compressed OP_MSG of 18 bytes": wire.compress(
        struct.pack("<iiii", 18, 1, 0, wire.OP_MSG) + b"\x00\x00", 0),
}


@pytest.mark.parametrize("name", sorted(SHORT_FRAMES))
def test_short_frames_are_protocol_errors(proxy, name):
    """Regression: these raised struct.error inside the relay ("unexpected error")."""
    client = RawClient(proxy.port)
    client.send(SHORT_FRAMES[name])
    assert client.closed_by_peer(timeout=5)
    client.close()
    assert "unexpected error" not in proxy.log()
    assert proxy.proc.poll() is None
