"""The routers mode: seeds classified at start-up, and the proxy's hello for a router."""

from __future__ import annotations

import datetime
import socket
from typing import Any

import bson
import pytest

from dvara_lib import config
from dvara_lib.address import parse_address
from dvara_lib.backend.connect import Backend
from dvara_lib.backend.discovery import Check, DiscoveryThread, discover
from dvara_lib.backend.pool import Pool
from dvara_lib.backend.topology import Member, Topology, is_router
from dvara_lib.errors import ConnectionFailure, DiscoveryError
from dvara_lib.observe import status_cli
from dvara_lib.observe.metrics import Metrics
from dvara_lib.proxy import hello

UTC = datetime.timezone.utc
R1, R2, R3 = "r1.example:27017", "r2.example:27017", "r3.example:27017"


def router_hello(**changes: Any) -> dict[str, Any]:
    """A mongos 6.0 hello."""
    doc = {"isWritablePrimary": True, "msg": "isdbgrid",
           "topologyVersion": {"processId": bson.ObjectId(), "counter": 0},
           "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
           "maxWriteBatchSize": 100000, "localTime": datetime.datetime.now(UTC),
           "logicalSessionTimeoutMinutes": 30, "connectionId": 41, "minWireVersion": 0,
           "maxWireVersion": 17, "readOnly": False, "ok": 1.0}
    doc.update(changes)
    return doc


MEMBER = {"isWritablePrimary": True, "setName": "rs0", "hosts": ["db1.example:27017"],
          "me": "db1.example:27017", "maxWireVersion": 17, "ok": 1.0}
STANDALONE = {"isWritablePrimary": True, "maxWireVersion": 17, "ok": 1.0}


class SeedBackend(Backend):
    """Answers probes from a table of hellos (a missing seed does not answer)."""

    def __init__(self, hellos: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.hellos = hellos

    def probe(self, address: tuple[str, int], timeout: float) -> dict[str, Any]:
        name = f"{address[0]}:{address[1]}"
        if name not in self.hellos:
            raise ConnectionFailure(f"{name}: connection refused")
        return self.hellos[name]


def seeds(*names: str) -> list[tuple[str, int]]:
    return [parse_address(name) for name in names]


def test_routers_are_the_seeds_even_one_that_did_not_answer() -> None:
    found = discover(SeedBackend({R1: router_hello(), R3: router_hello()}),
                     seeds(R1, R2, R3), timeout=1)
    assert found.routers and found.set_name is None
    assert found.members == [R1, R2, R3]
    assert set(found.hellos) == {R1, R3}


@pytest.mark.parametrize("other, said", [(MEMBER, "a member of replica set rs0"),
                                         (STANDALONE, "a standalone server")])
def test_a_router_mixed_with_another_kind_of_server_is_refused(other: dict, said: str) -> None:
    with pytest.raises(DiscoveryError) as err:
        discover(SeedBackend({R1: router_hello(), R2: other}), seeds(R1, R2), timeout=1)
    message = str(err.value)
    assert message.startswith(f"mixed seeds: {R1} answered as mongos router(s)")
    assert f"{R2} is {said}" in message


def test_several_standalones_are_still_refused() -> None:
    with pytest.raises(DiscoveryError, match="several seeds answered as standalone"):
        discover(SeedBackend({R1: STANDALONE, R2: STANDALONE}), seeds(R1, R2), timeout=1)


def never_connect() -> socket.socket:
    raise AssertionError("these tests never open a server connection")


@pytest.fixture
def routers() -> Topology:
    topo = Topology(None, routers=True)
    metrics = Metrics()
    for i, real in enumerate((R1, R2)):
        port = 40001 + i
        topo.add(Member(real, f"127.0.0.1:{port}", port, Pool(real, never_connect, max_size=1),
                        metrics.member(real)))
    return topo


def answer(topo: Topology, member: Member, command: str = "hello") -> Any:
    return hello.build_answer(topo, member, command, {"helloOk": True}, 7, [])


def test_a_router_is_answered_as_a_router(routers: Topology) -> None:
    member = routers.get(R1)
    real = router_hello()
    routers.update(member, real)
    doc = answer(routers, member)
    assert member.state == "ROUTER" and is_router(doc)
    assert doc["isWritablePrimary"] is True and "ismaster" not in doc
    assert doc["connectionId"] == 7
    assert doc["topologyVersion"] == {"processId": routers.process_id, "counter": member.counter}
    assert doc["topologyVersion"] != real["topologyVersion"]
    for field in ("hosts", "setName", "primary", "me", "secondary"):
        assert field not in doc
    assert {k: doc[k] for k in ("maxWireVersion", "logicalSessionTimeoutMinutes")} == {
        "maxWireVersion": 17, "logicalSessionTimeoutMinutes": 30}
    legacy = answer(routers, member, "isMaster")
    assert legacy["ismaster"] is True and legacy["msg"] == "isdbgrid"


def test_a_router_that_is_down_gets_no_answer(routers: Topology) -> None:
    member = routers.get(R1)
    routers.update(member, router_hello())
    counter = member.counter
    routers.update(member, None)
    assert member.state == "DOWN" and member.counter == counter + 1
    assert answer(routers, member) is None
    routers.update(member, router_hello())
    assert member.state == "ROUTER" and answer(routers, member) is not None


def test_a_member_that_answers_as_no_router_stays_down(routers: Topology,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    thread = DiscoveryThread(routers, interval=1, timeout=1, backend=SeedBackend({}))
    try:
        member = routers.get(R2)
        for _ in range(3):
            thread._apply(Check(member, MEMBER, []))
        assert not member.up and member.state == "DOWN"
        errors = [r for r in caplog.records if "not as a mongos router" in r.getMessage()]
        assert len(errors) == 1
        thread._apply(Check(member, router_hello(), []))
        assert member.up and member.state == "ROUTER"
    finally:
        thread._checks.shutdown()


def test_dvara_status_says_it_serves_routers() -> None:
    doc = {"version": "0.1.0", "uptime_s": 5, "routers": True, "set_name": None,
           "clients": {"connected": 1, "max": 10},
           "members": [{"member": R1, "proxy": "127.0.0.1:40001", "state": "ROUTER", "up": True}]}
    text = status_cli.render_status(doc)
    assert text.splitlines()[0] == "dvara 0.1.0  mongos routers  up 00:00:05  clients 1/10  members 1"
    assert "ROUTER" in text


def test_a_load_balanced_driver_gets_the_routers_service_id(routers: Topology) -> None:
    member, other = routers.get(R1), routers.get(R2)
    routers.update(member, router_hello())
    routers.update(other, router_hello())
    request = {"hello": 1, "loadBalanced": True}
    doc = hello.build_answer(routers, member, "hello", request, 7, [])
    assert doc["serviceId"] == member.service_id != other.service_id
    assert "serviceId" not in answer(routers, member)


def test_load_balanced_runs_in_one_process(capsys: pytest.CaptureFixture) -> None:
    assert config.parse_args(["--load-balanced"], env={}).load_balanced is True
    assert config.parse_args([], env={}).load_balanced is False
    with pytest.raises(SystemExit):
        config.parse_args(["--load-balanced", "--processes", "2"], env={})
    assert "--load-balanced: runs in one process only" in capsys.readouterr().err
