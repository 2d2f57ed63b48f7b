"""Topology address rewriting and change tracking, and the proxy's own hello answers."""

from __future__ import annotations

import copy
import datetime
import socket
from typing import Any

import bson
import pytest

from dvara_lib.proxy import hello
from dvara_lib.observe.metrics import Metrics
from dvara_lib.backend.pool import Pool
from dvara_lib.backend.topology import Member, Topology

REALS = ("db1.example:27017", "db2.example:27017", "db3.example:27017")
PROXIES = ("127.0.0.1:40001", "127.0.0.1:40002", "127.0.0.1:40003")
P1, P2, P3 = PROXIES
UTC = datetime.timezone.utc


def never_connect() -> socket.socket:
    raise AssertionError("these tests never open a server connection")


def make_member(real: str, proxy: str, metrics: Metrics) -> Member:
    pool = Pool(real, never_connect, max_size=1)
    return Member(real, proxy, int(proxy.rsplit(":", 1)[1]), pool, metrics.member(real))


@pytest.fixture
def topology() -> Topology:
    topo = Topology("rs0")
    metrics = Metrics()
    for real, proxy in zip(REALS, PROXIES):
        topo.add(make_member(real, proxy, metrics))
    return topo


@pytest.fixture
def m1(topology: Topology) -> Member:
    return topology.get(REALS[0])


def primary_hello(**changes: Any) -> dict[str, Any]:
    """db1's hello as a 6.0 primary would send it."""
    doc = {
        "topologyVersion": {"processId": bson.ObjectId(), "counter": 6},
        "hosts": ["db1.example:27017", "db2.example:27017", "gone.example:27017"],
        "passives": ["db3.example:27017"],
        "arbiters": ["arbiter.example:27017"],
        "setName": "rs0",
        "setVersion": 3,
        "isWritablePrimary": True,
        "secondary": False,
        "primary": "db1.example:27017",
        "me": "db1.example:27017",
        "electionId": bson.ObjectId("7fffffff0000000000000002"),
        "lastWrite": {"opTime": {"ts": bson.Timestamp(1700000000, 1), "t": 2},
                      "lastWriteDate": datetime.datetime(2024, 1, 1, tzinfo=UTC)},
        "maxBsonObjectSize": 16777216,
        "maxMessageSizeBytes": 48000000,
        "maxWriteBatchSize": 100000,
        "localTime": datetime.datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC),
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": 12,
        "minWireVersion": 0,
        "maxWireVersion": 17,
        "readOnly": False,
        "compression": ["zlib"],
        "saslSupportedMechs": ["SCRAM-SHA-256"],
        "speculativeAuthenticate": {"conversationId": 1, "done": False},
        "helloOk": True,
        "$clusterTime": {"clusterTime": bson.Timestamp(1700000000, 1),
                         "signature": {"hash": b"\x00" * 20, "keyId": 0}},
        "operationTime": bson.Timestamp(1700000000, 1),
        "ok": 1.0,
    }
    doc.update(changes)
    return doc


def secondary_hello() -> dict[str, Any]:
    return primary_hello(isWritablePrimary=False, secondary=True, me="db2.example:27017")


# --- membership --------------------------------------------------------------------------------

def test_members_get_and_remove(topology, m1):
    assert [m.real for m in topology.members()] == list(REALS)
    assert m1.proxy == P1 and m1.proxy_port == 40001 and m1.address == ("db1.example", 27017)
    assert topology.proxy_of("db1.example:27017") == P1
    topology.remove(m1)
    assert topology.get(REALS[0]) is None and topology.proxy_of(REALS[0]) is None
    assert [m.real for m in topology.members()] == list(REALS[1:])


def test_a_new_member_is_down_with_no_answer(m1):
    assert (m1.up, m1.answer, m1.hello, m1.counter, m1.state) == (False, None, None, 0, "DOWN")


# --- rewrite_hello -----------------------------------------------------------------------------

def test_rewrite_hello_maps_host_fields_to_proxy_addresses(topology):
    out = topology.rewrite_hello(primary_hello())
    assert out["hosts"] == [P1, P2]          # gone.example is not a member: dropped
    assert out["passives"] == [P3]
    assert out["arbiters"] == []
    assert out["primary"] == P1 and out["me"] == P1


def test_rewrite_hello_drops_per_connection_fields(topology):
    out = topology.rewrite_hello(primary_hello())
    for field in ("connectionId", "topologyVersion", "compression", "saslSupportedMechs",
                  "speculativeAuthenticate", "helloOk", "localTime"):
        assert field not in out, field
    original = primary_hello()
    for field in ("setName", "setVersion", "electionId", "lastWrite", "maxWireVersion",
                  "isWritablePrimary", "secondary", "$clusterTime", "ok"):
        assert out[field] == original[field], field


def test_rewrite_hello_drops_unknown_primary_and_me(topology):
    out = topology.rewrite_hello(primary_hello(primary="other.example:27017",
                                               me="other.example:27017"))
    assert "primary" not in out and "me" not in out


def test_rewrite_hello_matches_hosts_case_insensitively(topology):
    out = topology.rewrite_hello(primary_hello(hosts=["DB1.Example:27017", "db2.EXAMPLE:27017"],
                                               primary="DB2.example:27017",
                                               me="Db1.Example:27017"))
    assert out["hosts"] == [P1, P2]
    assert (out["primary"], out["me"]) == (P2, P1)


def test_rewrite_hello_does_not_change_its_argument(topology):
    doc = primary_hello()
    before = copy.deepcopy(doc)
    topology.rewrite_hello(doc)
    assert doc == before


# --- rewrite_addresses -------------------------------------------------------------------------

def test_rewrite_addresses_recurses_into_dicts_and_lists(topology):
    status = {
        "set": "rs0",
        "syncSourceHost": "db1.example:27017",
        "members": [
            {"_id": 0, "name": "db1.example:27017", "stateStr": "PRIMARY",
             "syncSourceHost": "", "syncingTo": ""},
            {"_id": 1, "name": "DB2.example:27017", "stateStr": "SECONDARY",
             "syncSourceHost": "db1.example:27017", "syncingTo": "db1.example:27017"},
            {"_id": 2, "name": "db3.example:27017", "optime": {"ts": bson.Timestamp(1, 1)},
             "tags": [["db3.example:27017", 3]], "syncSourceHost": "db2.example:27017"},
        ],
        "other": "elsewhere.example:27017",
        "ok": 1.0,
    }
    out = topology.rewrite_addresses(status)
    assert out["syncSourceHost"] == P1
    assert [m["name"] for m in out["members"]] == [P1, P2, P3]
    assert out["members"][0]["syncSourceHost"] == "" and out["members"][0]["syncingTo"] == ""
    assert out["members"][1]["syncSourceHost"] == P1 and out["members"][1]["syncingTo"] == P1
    assert out["members"][2]["syncSourceHost"] == P2
    assert out["members"][2]["tags"] == [[P3, 3]]
    assert out["members"][2]["optime"] == {"ts": bson.Timestamp(1, 1)}
    assert out["other"] == "elsewhere.example:27017"
    assert (out["set"], out["ok"]) == ("rs0", 1.0)


@pytest.mark.parametrize("value", [None, 1, 2.5, True, b"db1.example:27017", "rs0"])
def test_rewrite_addresses_keeps_other_values(topology, value):
    assert topology.rewrite_addresses(value) == value


# --- update --------------------------------------------------------------------------------------

def test_update_records_the_first_hello_and_notifies(topology, m1):
    seen: list[Member] = []
    topology.on_change(seen.append)
    assert topology.update(m1, primary_hello()) is True
    assert m1.up and m1.counter == 1 and seen == [m1]
    assert m1.answer == topology.rewrite_hello(primary_hello())
    assert m1.hello["connectionId"] == 12
    assert m1.max_wire_version == 17
    assert m1.state == "PRIMARY"


def test_update_with_the_same_hello_changes_nothing(topology, m1):
    seen: list[Member] = []
    topology.on_change(seen.append)
    topology.update(m1, primary_hello())
    assert topology.update(m1, primary_hello()) is False
    assert m1.counter == 1 and seen == [m1]


def test_update_ignores_volatile_fields(topology, m1):
    seen: list[Member] = []
    topology.on_change(seen.append)
    topology.update(m1, primary_hello())
    later = primary_hello(
        localTime=datetime.datetime(2024, 1, 2, tzinfo=UTC),
        lastWrite={"opTime": {"ts": bson.Timestamp(1700000099, 5), "t": 2},
                   "lastWriteDate": datetime.datetime(2024, 1, 2, tzinfo=UTC)},
        **{"$clusterTime": {"clusterTime": bson.Timestamp(1700000099, 5),
                            "signature": {"hash": b"\x01" * 20, "keyId": 7}}},
        operationTime=bson.Timestamp(1700000099, 5),
        connectionId=99,
        topologyVersion={"processId": bson.ObjectId(), "counter": 7},
        hosts=["db1.example:27017", "db2.example:27017", "another-unknown.example:1"],
    )
    assert topology.update(m1, later) is False
    assert m1.counter == 1 and seen == [m1]
    assert m1.hello is later
    assert m1.answer["lastWrite"] == later["lastWrite"]


@pytest.mark.parametrize("changes", [
    {"isWritablePrimary": False, "secondary": True},
    {"hosts": ["db1.example:27017"]},
    {"primary": "db2.example:27017"},
    {"setVersion": 4},
    {"electionId": bson.ObjectId("7fffffff0000000000000003")},
    {"tags": {"dc": "east"}},
])
def test_update_bumps_the_counter_when_the_answer_changes(topology, m1, changes):
    seen: list[Member] = []
    topology.on_change(seen.append)
    topology.update(m1, primary_hello())
    assert topology.update(m1, primary_hello(**changes)) is True
    assert m1.counter == 2 and seen == [m1, m1]


def test_update_marks_down_and_up_again(topology, m1):
    seen: list[Member] = []
    topology.on_change(seen.append)
    topology.update(m1, primary_hello())
    answer = m1.answer
    assert topology.update(m1, None) is True
    assert (m1.up, m1.counter, m1.state) == (False, 2, "DOWN")
    assert m1.answer == answer        # the last known answer is kept
    assert topology.update(m1, None) is False
    assert m1.counter == 2
    assert topology.update(m1, primary_hello()) is True
    assert (m1.up, m1.counter, m1.state) == (True, 3, "PRIMARY")
    assert seen == [m1, m1, m1]


def test_update_of_a_member_that_never_answered(topology, m1):
    seen: list[Member] = []
    topology.on_change(seen.append)
    assert topology.update(m1, None) is False
    assert (m1.up, m1.answer, m1.counter) == (False, None, 0) and seen == []


def test_update_only_touches_its_own_member(topology, m1):
    topology.update(m1, primary_hello())
    m2 = topology.get(REALS[1])
    assert topology.update(m2, secondary_hello()) is True
    assert (m1.counter, m2.counter) == (1, 1)
    assert m2.state == "SECONDARY" and m2.answer["me"] == P2


# --- hello.build_answer ------------------------------------------------------------------------

def answer(topology: Topology, member: Member, command: str = "hello",
           request: dict[str, Any] | None = None, connection_id: int = 5) -> dict[str, Any]:
    request = {command: 1} if request is None else request
    doc = hello.build_answer(topology, member, command, request, connection_id,
                             hello.negotiate_compression(request))
    assert doc is not None
    return doc


def test_build_answer_is_none_before_the_member_answered(topology, m1):
    assert hello.build_answer(topology, m1, "hello", {"hello": 1}, 1, []) is None
    topology.update(m1, None)
    assert hello.build_answer(topology, m1, "hello", {"hello": 1}, 1, []) is None


def test_build_answer_to_hello_says_is_writable_primary(topology, m1):
    topology.update(m1, primary_hello())
    doc = answer(topology, m1, "hello")
    assert doc["isWritablePrimary"] is True and "ismaster" not in doc
    assert doc["secondary"] is False
    assert doc["hosts"] == [P1, P2] and doc["primary"] == P1 and doc["me"] == P1
    assert isinstance(doc["localTime"], datetime.datetime)
    assert doc["ok"] == 1.0 and list(doc)[-1] == "ok"


@pytest.mark.parametrize("command", ["isMaster", "ismaster"])
def test_build_answer_to_legacy_is_master_says_ismaster(topology, m1, command):
    topology.update(m1, primary_hello())
    doc = answer(topology, m1, command)
    assert doc["ismaster"] is True and "isWritablePrimary" not in doc


@pytest.mark.parametrize("command, key, other", [
    ("hello", "isWritablePrimary", "ismaster"), ("isMaster", "ismaster", "isWritablePrimary")])
def test_build_answer_of_a_secondary(topology, command, key, other):
    m2 = topology.get(REALS[1])
    topology.update(m2, secondary_hello())
    doc = answer(topology, m2, command)
    assert doc[key] is False and other not in doc
    assert doc["secondary"] is True and doc["primary"] == P1 and doc["me"] == P2


def test_build_answer_from_a_legacy_server_hello(topology, m1):
    legacy = primary_hello(ismaster=True)
    del legacy["isWritablePrimary"]
    topology.update(m1, legacy)
    assert answer(topology, m1, "hello")["isWritablePrimary"] is True
    doc = answer(topology, m1, "isMaster")
    assert doc["ismaster"] is True and "isWritablePrimary" not in doc


def test_build_answer_echoes_hello_ok_only_when_asked(topology, m1):
    topology.update(m1, primary_hello())
    assert "helloOk" not in answer(topology, m1, "isMaster")
    assert "helloOk" not in answer(topology, m1, "isMaster", {"isMaster": 1, "helloOk": False})
    assert answer(topology, m1, "isMaster", {"isMaster": 1, "helloOk": True})["helloOk"] is True


@pytest.mark.parametrize("offered, agreed", [
    (["snappy", "zlib", "zstd"], ["snappy", "zlib", "zstd"]),
    (["zlib"], ["zlib"]),
    (["zstd", "snappy"], ["zstd", "snappy"]),
    (["lz4", "zstd", "noop"], ["zstd"]),
    ([], []),
    ("zlib", []),
])
def test_build_answer_reports_compression_only_when_asked(topology, m1, offered, agreed):
    topology.update(m1, primary_hello())
    request = {"hello": 1, "compression": offered}
    assert hello.negotiate_compression(request) == agreed
    assert answer(topology, m1, "hello", request)["compression"] == agreed
    assert "compression" not in answer(topology, m1, "hello", {"hello": 1})


def test_build_answer_topology_version_and_connection_id(topology, m1):
    topology.update(m1, primary_hello())
    topology.update(m1, secondary_hello())
    a = answer(topology, m1, connection_id=5)
    b = answer(topology, m1, connection_id=6)
    assert a["topologyVersion"] == {"processId": topology.process_id, "counter": 2}
    assert isinstance(topology.process_id, bson.ObjectId)
    assert (a["connectionId"], b["connectionId"]) == (5, 6)
    for field in ("saslSupportedMechs", "speculativeAuthenticate"):
        assert field not in a


@pytest.mark.parametrize("command, key, other", [
    ("hello", "isWritablePrimary", "ismaster"), ("isMaster", "ismaster", "isWritablePrimary")])
def test_build_answer_of_a_down_member(topology, m1, command, key, other):
    topology.update(m1, primary_hello(arbiterOnly=False))
    topology.update(m1, None)
    before = copy.deepcopy(m1.answer)
    doc = answer(topology, m1, command)
    assert doc[key] is False and other not in doc
    assert doc["secondary"] is False
    assert "primary" not in doc and "arbiterOnly" not in doc
    assert doc["topologyVersion"]["counter"] == 2
    assert m1.answer == before       # the shared answer is never mutated


def test_build_answer_does_not_mutate_the_shared_answer(topology, m1):
    topology.update(m1, primary_hello())
    before = copy.deepcopy(m1.answer)
    answer(topology, m1, "isMaster", {"isMaster": 1, "helloOk": True, "compression": ["zlib"]})
    assert m1.answer == before


def test_is_hello():
    assert all(hello.is_hello(n) for n in ("hello", "isMaster", "ismaster"))
    assert not any(hello.is_hello(n) for n in ("HELLO", "find", "", None))


# --- hello.wait_seconds ------------------------------------------------------------------------

def current_tv(topology: Topology, member: Member) -> dict[str, Any]:
    return {"processId": topology.process_id, "counter": member.counter}


def test_wait_seconds_is_zero_without_topology_version_or_max_await(topology, m1):
    topology.update(m1, primary_hello())
    assert hello.wait_seconds({"hello": 1}, topology, m1) == 0
    assert hello.wait_seconds({"hello": 1, "maxAwaitTimeMS": 10000}, topology, m1) == 0
    assert hello.wait_seconds({"hello": 1, "topologyVersion": current_tv(topology, m1)},
                              topology, m1) == 0


def test_wait_seconds_is_max_await_when_the_client_is_current(topology, m1):
    topology.update(m1, primary_hello())
    request = {"hello": 1, "topologyVersion": current_tv(topology, m1), "maxAwaitTimeMS": 10000}
    assert hello.wait_seconds(request, topology, m1) == 10.0
    request["maxAwaitTimeMS"] = bson.Int64(250)
    assert hello.wait_seconds(request, topology, m1) == 0.25


def test_wait_seconds_is_zero_when_the_client_is_stale(topology, m1):
    topology.update(m1, primary_hello())
    tv = current_tv(topology, m1)
    stale_process = {"hello": 1, "maxAwaitTimeMS": 10000,
                     "topologyVersion": {"processId": bson.ObjectId(), "counter": m1.counter}}
    assert hello.wait_seconds(stale_process, topology, m1) == 0
    stale_counter = {"hello": 1, "maxAwaitTimeMS": 10000,
                     "topologyVersion": {"processId": tv["processId"], "counter": 0}}
    assert hello.wait_seconds(stale_counter, topology, m1) == 0
    request = {"hello": 1, "maxAwaitTimeMS": 10000, "topologyVersion": tv}
    topology.update(m1, secondary_hello())
    assert hello.wait_seconds(request, topology, m1) == 0


@pytest.mark.parametrize("max_await", [-1, "10000", None])
def test_wait_seconds_is_zero_for_a_bad_max_await(topology, m1, max_await):
    topology.update(m1, primary_hello())
    request = {"hello": 1, "topologyVersion": current_tv(topology, m1),
               "maxAwaitTimeMS": max_await}
    assert hello.wait_seconds(request, topology, m1) == 0


def test_wait_seconds_uses_the_counter_build_answer_reports(topology, m1):
    topology.update(m1, primary_hello())
    doc = answer(topology, m1)
    request = {"hello": 1, "topologyVersion": doc["topologyVersion"], "maxAwaitTimeMS": 500}
    assert hello.wait_seconds(request, topology, m1) == 0.5
