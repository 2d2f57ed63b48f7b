"""The relay in process, against a scripted server on socketpairs.

A message goes to the server as the same bytes and the reply comes back as the same
bytes; the server connection is back in its pool before the client is written; a pinned
connection carries a client's next message; and a server that fails or a pool that is
full turns into a MongoDB-shaped error (or a closed client) without losing a connection.
"""

from __future__ import annotations

import socket
from typing import Any

import bson

from dvara_lib import wire
from dvara_lib.proxy.client import Verdict
from tests.relay_rig import ok

def reply_doc(sock: socket.socket) -> dict[str, Any]:
    frame = wire.read_frame(sock)
    if wire.opcode(frame) == wire.OP_COMPRESSED:
        frame, _ = wire.decompress(frame)
    return wire.reply_document(frame)


def test_a_command_and_its_reply_pass_as_the_same_bytes(rig):
    r = rig()
    client, peer = r.client()
    frame = wire.op_msg({"find": "c", "filter": {"a": 1}, "$db": "d"})
    assert r.relay.serve_one(client, frame) is Verdict.RESUME
    assert r.server.received == [frame]
    reply = wire.read_frame(peer)
    assert reply == ok(frame)[0]
    assert r.in_use_at_write == [0]            # checked in before the client was written
    assert (r.member.pool.open_count, r.member.pool.in_use) == (1, 0)


def test_the_slow_path_too_checks_in_before_writing(rig):
    r = rig()
    client, peer = r.client()
    frame = wire.op_msg({"replSetGetStatus": 1, "$db": "admin"})   # reply is rewritten
    assert r.relay.serve_one(client, frame) is Verdict.RESUME
    assert reply_doc(peer) == {"ok": 1.0, "n": 1}
    assert r.in_use_at_write == [0]


def test_a_compressed_request_reaches_the_server_plain_and_its_reply_goes_back_compressed(rig):
    r = rig()
    client, peer = r.client()
    plain = wire.op_msg({"ping": 1, "$db": "admin"})
    frame = wire.compress(plain, wire.COMPRESSOR_IDS["zlib"])
    assert r.relay.serve_one(client, frame) is Verdict.RESUME
    assert r.server.received == [plain]
    reply = wire.read_frame(peer)
    assert wire.opcode(reply) == wire.OP_COMPRESSED
    assert wire.decompress(reply)[0] == ok(plain)[0]


def test_a_request_that_expects_no_reply_pins_its_connection_for_the_next(rig):
    r = rig()
    client, peer = r.client()
    write = wire.op_msg({"insert": "c", "documents": [{"a": 1}], "$db": "d"},
                        flags=wire.MORE_TO_COME)
    assert r.relay.serve_one(client, write) is Verdict.RESUME
    assert client.pinned is not None and r.member.pool.in_use == 1
    read = wire.op_msg({"find": "c", "$db": "d"})
    assert r.relay.serve_one(client, read) is Verdict.RESUME
    assert reply_doc(peer) == {"ok": 1.0, "n": 1}
    assert r.server.received == [write, read] and r.server.connects == 1
    assert client.pinned is None and r.member.pool.in_use == 0


def test_a_server_that_hangs_up_closes_the_client_and_retires_the_pool(rig):
    r = rig(lambda frame: None)
    client, peer = r.client()
    generation = r.member.pool.generation
    assert r.relay.serve_one(client, wire.op_msg({"ping": 1, "$db": "admin"})) \
        is Verdict.CLOSE
    assert r.failures == [r.member]            # discovery is asked to look at it
    assert r.member.pool.generation == generation + 1
    assert (r.member.pool.open_count, r.member.pool.in_use) == (0, 0)


def test_a_full_pool_answers_a_retryable_exceeded_time_limit(rig):
    r = rig(ok, "--max-connections", "1")
    held = r.member.pool.checkout(1.0)
    try:
        client, peer = r.client()
        frame = wire.op_msg({"ping": 1, "$db": "admin"})
        assert r.relay.serve_one(client, frame) is Verdict.RESUME
        doc = reply_doc(peer)
    finally:
        r.member.pool.checkin(held, True)
    assert doc["code"] == 262 and doc["codeName"] == "ExceededTimeLimit"
    assert doc["errorLabels"] == ["RetryableWriteError"] and doc["ok"] == 0
    assert r.server.received == []


def test_a_member_found_down_answers_host_unreachable_without_connecting(rig):
    r = rig()
    r.topology.update(r.member, None)
    client, peer = r.client()
    query = wire.op_query("admin.$cmd", {"ping": 1})
    assert r.relay.serve_one(client, query) is Verdict.RESUME
    doc = wire.reply_document(wire.read_frame(peer))
    assert doc["code"] == 6 and doc["codeName"] == "HostUnreachable"
    assert r.server.connects == 0


def test_the_fast_path_does_not_use_an_idle_connection_to_a_member_found_down(rig):
    """A plain OP_MSG (the fast path) to a member whose last check failed is answered
    HostUnreachable, though its pool still holds an idle connection."""
    r = rig()
    client, peer = r.client()
    ping = wire.op_msg({"ping": 1, "$db": "admin"})
    assert r.relay.serve_one(client, ping) is Verdict.RESUME
    wire.read_frame(peer)
    assert r.member.pool.open_count == 1 and r.member.pool.in_use == 0
    r.topology.update(r.member, None)
    assert r.relay.serve_one(client, ping) is Verdict.RESUME
    assert reply_doc(peer)["code"] == 6
    assert r.server.received == [ping]          # nothing more reached the server


def test_a_not_primary_reply_is_relayed_and_has_discovery_look(rig):
    def not_primary(frame: bytes) -> list[bytes]:
        return [wire.op_msg({"ok": 0.0, "errmsg": "not primary", "code": 10107,
                             "codeName": "NotWritablePrimary"}, resp_to=wire.request_id(frame))]

    r = rig(not_primary)
    client, peer = r.client()
    frame = wire.op_msg({"insert": "c", "documents": [{"a": bson.Int64(1)}], "$db": "d"})
    assert r.relay.serve_one(client, frame) is Verdict.RESUME
    assert reply_doc(peer)["code"] == 10107
    assert r.state_changes == [(r.member, False)]
    assert r.member.pool.in_use == 0
