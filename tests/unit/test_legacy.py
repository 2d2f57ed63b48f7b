"""The legacy half of the relay in process: how mongod 2.4's last error is kept and read
(the end-to-end behaviour against a scripted 2.4 mongod is tests/integration/test_legacy.py)."""

from __future__ import annotations

import bson
import pytest

from dvara_lib import wire
from dvara_lib.proxy import legacy, session
from dvara_lib.proxy.client import Verdict
from tests.legacy_peers import DUP_KEY


@pytest.mark.parametrize("value, expected", [
    (None, False), (False, False), (0, False), (0.0, False), (bson.Int64(0), False),
    (bson.Decimal128("0"), False), (True, True), (1, True), (-2.5, True), ("", True),
    ("no", True), ({}, True), ([], True)])
def test_for_shell_is_read_as_mongod_reads_it(value, expected):
    assert legacy._true_value(value) is expected


def test_prev_error_from_a_kept_reply():
    state = session.LastError()
    assert legacy.prev_error_doc(state) == {"err": None, "n": 0, "nPrev": -1, "ok": 1.0}
    state.reply = wire.op_reply([{"err": DUP_KEY, "code": 11000, "n": 0, "connectionId": 9,
                                  "ok": 1.0}], 1)
    state.nprev = 3
    assert legacy.prev_error_doc(state) == {"err": DUP_KEY, "code": 11000, "n": 0, "nPrev": 3,
                                            "ok": 1.0}


# -- through the relay, against a scripted 2.4-era server ---------------------------------------

def mongod24(frame: bytes) -> list[bytes]:
    """Writes get no reply; a query or command gets {n: 1} (as after one insert)."""
    if wire.opcode(frame) in legacy.LEGACY_WRITES:
        return []
    return [wire.op_reply([{"err": None, "n": 1, "connectionId": 42, "ok": 1.0}],
                          wire.request_id(frame))]


def insert_frame() -> bytes:
    body = b"\x00\x00\x00\x00" + b"d.c\x00" + bson.encode({"a": 1})
    return wire.HEADER.pack(16 + len(body), wire.next_request_id(), 0, wire.OP_INSERT) + body


def gle() -> bytes:
    return wire.op_query("d.$cmd", {"getLastError": 1})


def test_get_last_error_runs_on_the_connection_of_its_write_then_comes_from_memory(rig):
    r = rig(mongod24, wire_version=0)
    client, peer = r.client()
    write = insert_frame()
    assert r.relay.serve_one(client, write) is Verdict.RESUME
    assert client.pinned is not None
    first = gle()
    assert r.relay.serve_one(client, first) is Verdict.RESUME
    assert wire.reply_document(wire.read_frame(peer))["n"] == 1
    assert r.server.received == [write, first] and r.server.connects == 1
    assert client.pinned is None and r.member.pool.in_use == 0
    again = gle()                             # mongod answers a repeat from its memory too
    assert r.relay.serve_one(client, again) is Verdict.RESUME
    reply = wire.read_frame(peer)
    assert wire.response_to(reply) == wire.request_id(again)
    assert wire.reply_document(reply)["n"] == 1
    assert len(r.server.received) == 2


def test_get_last_error_without_a_write_never_reaches_the_server(rig):
    r = rig(mongod24, wire_version=0)
    client, peer = r.client()
    assert r.relay.serve_one(client, gle()) is Verdict.RESUME
    doc = wire.reply_document(wire.read_frame(peer))
    assert doc["err"] is None and doc["n"] == 0 and doc["ok"] == 1.0
    assert r.server.received == []


def test_op_msg_to_a_2_4_era_member_is_refused_with_incompatible_server_version(rig):
    r = rig(mongod24, wire_version=0)
    client, peer = r.client()
    assert r.relay.serve_one(client, wire.op_msg({"ping": 1, "$db": "admin"})) \
        is Verdict.RESUME
    doc = wire.decode_msg_body(wire.read_frame(peer))
    assert doc["code"] == 188 and doc["codeName"] == "IncompatibleServerVersion"
    assert r.server.received == []
