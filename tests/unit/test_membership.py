"""Unit tests: which members are proxied, and stable port assignment."""

from __future__ import annotations

import json

from dvara_lib.backend.membership import PortBook, wanted_members


def _hello(me: str, primary: bool, hosts: list[str], **extra) -> dict:
    return {"setName": "rs", "me": me, "isWritablePrimary": primary, "hosts": hosts, **extra}


def test_the_primary_decides_membership():
    hellos = {"a:1": _hello("a:1", True, ["a:1", "b:1"], arbiters=["c:1"]),
              "d:1": _hello("d:1", False, ["a:1", "b:1", "d:1"])}
    assert wanted_members(hellos, ["a:1", "d:1"]) == ["a:1", "b:1", "c:1"]


def test_without_a_primary_members_are_only_added():
    hellos = {"a:1": None, "b:1": _hello("b:1", False, ["b:1", "e:1"])}
    assert wanted_members(hellos, ["a:1", "b:1"]) == ["a:1", "b:1", "e:1"]


def test_extra_names_and_case_are_normalised():
    hellos = {"A:1": _hello("A:1", True, ["A:1"], passives=["P:1"])}
    assert wanted_members(hellos, [], extra=["h:1"]) == ["a:1", "p:1", "h:1"]


def test_ports_are_assigned_in_order_and_kept(tmp_path):
    state = tmp_path / "state.json"
    book = PortBook(7000, 7002, state_file=str(state))
    assert [book.port_for(m, []) for m in ("a:1", "b:1")] == [7000, 7001]
    assert json.loads(state.read_text())["ports"] == {"a:1": 7000, "b:1": 7001}
    again = PortBook(7000, 7002, state_file=str(state))
    assert again.port_for("b:1", []) == 7001
    assert again.port_for("c:1", [7001]) == 7002


def test_member_map_wins_and_its_ports_are_never_given_away():
    book = PortBook(7000, 7001, member_map=[(("b", 1), 7000)])
    assert book.port_for("b:1", []) == 7000
    assert book.port_for("a:1", [7000]) == 7001


def test_a_full_range_reuses_the_port_of_a_departed_member():
    book = PortBook(7000, 7000)
    assert book.port_for("a:1", []) == 7000
    assert book.port_for("b:1", [7000]) is None
    assert book.port_for("b:1", []) == 7000


def test_an_unreadable_state_file_is_ignored(tmp_path):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    book = PortBook(7000, 7001, state_file=str(state))
    assert book.port_for("a:1", []) == 7000
    assert json.loads(state.read_text())["ports"] == {"a:1": 7000}
