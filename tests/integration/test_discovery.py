"""Discovery follows the replica set live: members, kinds, primaries, stable ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Dvara, RawClient, accepts, free_port, wait_until
from tests.mock_rs import MockReplicaSet


@pytest.fixture()
def rs_factory():
    sets: list[MockReplicaSet] = []

    def make(kinds: list[str]) -> MockReplicaSet:
        rs = MockReplicaSet(kinds)
        sets.append(rs)
        return rs

    yield make
    for rs in sets:
        rs.stop()


def _hello(port: int) -> dict:
    raw = RawClient(port, timeout=10)
    try:
        return raw.command({"hello": 1})
    finally:
        raw.close()


def _proxy_ports(proxy: Dvara) -> dict[str, int]:
    """real member → proxy port, from dvara's log."""
    ports = {}
    for line in proxy.log().splitlines():
        if "proxying member" in line:
            real, proxied = line.split("proxying member ", 1)[1].split(" on ")
            ports[real.strip()] = int(proxied.rsplit(":", 1)[1])
    return ports


def _wait_members(proxy: Dvara, count: int) -> dict[str, int]:
    return wait_until(lambda: len(_proxy_ports(proxy)) == count and _proxy_ports(proxy),
                      f"{count} proxied members", 15)


def test_three_members_from_one_seed(rs_factory, start_dvara, tmp_path: Path):
    rs = rs_factory(["primary", "secondary", "secondary"])
    tee = tmp_path / "tee.bin"
    proxy = start_dvara(rs.primary(), "--tee-file", str(tee), ports=5)
    ports = _wait_members(proxy, 3)
    proxies = {f"127.0.0.1:{p}" for p in ports.values()}
    for real, port in ports.items():
        hello = _hello(port)
        assert hello["me"] == f"127.0.0.1:{port}"
        assert set(hello["hosts"]) == proxies
        assert hello["primary"] == f"127.0.0.1:{ports[rs.primary()]}"
    # a new primary shows through every listener within an interval
    old, new = rs.primary(), rs.names("secondary")[0]
    rs.set_kind(old, "secondary")
    rs.set_kind(new, "primary")
    for port in ports.values():
        wait_until(lambda: _hello(port).get("primary") == f"127.0.0.1:{ports[new]}",
                   "the new primary through every listener", 5)
    # a removed member's listener closes; the others keep serving
    gone = rs.names("secondary")[-1]
    rs.remove(gone)
    wait_until(lambda: not accepts(ports[gone]), "the removed member's listener to close", 10)
    for real, port in ports.items():
        if real != gone:
            assert f"127.0.0.1:{ports[gone]}" not in _hello(port)["hosts"]
    # an added member gets a listener
    added = rs.add("secondary").name
    ports = wait_until(lambda: added in _proxy_ports(proxy) and _proxy_ports(proxy),
                       "a listener for the new member", 10)
    wait_until(lambda: f"127.0.0.1:{ports[added]}" in _hello(ports[rs.primary()])["hosts"],
               "the new member in the primary's hosts", 10)
    assert _hello(ports[added])["me"] == f"127.0.0.1:{ports[added]}"
    _assert_no_real_address(tee.read_bytes(), rs)


def _assert_no_real_address(data: bytes, rs: MockReplicaSet) -> None:
    assert data, "the tee file captured nothing"
    for name in list(rs.members):
        assert name.encode() not in data, f"{name} was sent to a client"


def test_every_member_kind_is_mapped(rs_factory, start_dvara, tmp_path: Path):
    rs = rs_factory(["primary", "passive", "arbiter", "hidden", "recovering"])
    tee = tmp_path / "tee.bin"
    proxy = start_dvara(rs.primary(), "--tee-file", str(tee), ports=6)
    ports = _wait_members(proxy, 5)
    primary = _hello(ports[rs.primary()])
    assert primary["passives"] == [f"127.0.0.1:{ports[rs.names('passive')[0]]}"]
    assert primary["arbiters"] == [f"127.0.0.1:{ports[rs.names('arbiter')[0]]}"]
    assert f"127.0.0.1:{ports[rs.names('recovering')[0]]}" in primary["hosts"]
    hidden = _hello(ports[rs.names("hidden")[0]])
    assert hidden["hidden"] is True
    assert hidden["me"] == f"127.0.0.1:{ports[rs.names('hidden')[0]]}"
    raw = RawClient(ports[rs.primary()])
    status = raw.command({"replSetGetStatus": 1})
    raw.close()
    assert {m["name"] for m in status["members"]} == {f"127.0.0.1:{p}" for p in ports.values()}
    assert status["syncSourceHost"] == f"127.0.0.1:{ports[rs.primary()]}"
    _assert_no_real_address(tee.read_bytes(), rs)


def test_ports_are_stable_across_restarts(rs_factory, tmp_path: Path):
    rs = rs_factory(["primary", "secondary", "secondary"])
    state = tmp_path / "state.json"
    first = Dvara(tmp_path, rs.primary(), "--state-file", str(state), ports=6)
    try:
        before = _wait_members(first, 3)
    finally:
        first.stop()
    assert state.exists()
    seed = rs.names("secondary")[1]    # seed with another member this time
    second = Dvara(tmp_path, seed, "--state-file", str(state), ports=6, port_start=first.port_start)
    try:
        assert _wait_members(second, 3) == before
    finally:
        second.stop()


def test_member_map_pins_ports(rs_factory, start_dvara):
    rs = rs_factory(["primary", "secondary"])
    secondary = rs.names("secondary")[0]
    pinned = free_port()
    proxy = start_dvara(rs.primary(), "--member-map", f"{secondary}={pinned}", ports=2)
    ports = _wait_members(proxy, 2)
    assert ports[secondary] == pinned
    assert _hello(pinned)["me"] == f"127.0.0.1:{pinned}"


def test_range_too_small_at_start_exits_2(rs_factory, start_dvara):
    rs = rs_factory(["primary", "secondary", "secondary"])
    proxy = start_dvara(rs.primary(), ports=1, wait=False)
    assert proxy.proc.wait(30) == 2
    assert "--port-start/--port-end" in proxy.log()


def test_seeds_that_disagree_exit_with_a_clear_error(rs_factory, start_dvara):
    one, other = rs_factory(["primary"]), rs_factory(["primary"])
    other.set_name = "other"
    proxy = start_dvara(f"{one.primary()},{other.primary()}", wait=False)
    assert proxy.proc.wait(30) == 1
    assert "disagree on the replica set name" in proxy.log()


def test_no_seed_answering_exits_with_a_clear_error(start_dvara):
    proxy = start_dvara(f"127.0.0.1:{free_port()}", wait=False)
    assert proxy.proc.wait(60) == 1
    assert "no seed answered" in proxy.log()
