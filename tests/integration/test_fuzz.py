"""Fuzzed frames from many raw connections at a live dvara process, bounded in time (the
in-process half is tests/unit/test_fuzz.py; scripts/fuzz.py runs both for longer).
"""

from __future__ import annotations

import math
import os
import random
import struct
import time

import pytest
from pymongo import MongoClient

from dvara_lib import wire
from tests.fuzz_harness import Mutator, throw_frames
from tests.helpers import Dvara, RawClient, wait_until


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
