"""Awaitable hellos are parked by the proxy and answered on change or at their deadline."""

from __future__ import annotations

import time

from pymongo import MongoClient

from dvara_lib import wire
from tests.helpers import RawClient, free_port, metric_sum, wait_until


def _hello(raw: RawClient) -> dict:
    return raw.command({"hello": 1})


def test_awaitable_hello_waits_for_its_deadline(secantus, start_dvara):
    proxy = start_dvara(secantus.address)
    raw = RawClient(proxy.port)
    first = _hello(raw)
    tv = first["topologyVersion"]
    start = time.monotonic()
    again = raw.command({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 700})
    assert time.monotonic() - start >= 0.6
    assert again["topologyVersion"] == tv
    stale = {"processId": tv["processId"], "counter": tv["counter"] - 1}
    start = time.monotonic()
    assert raw.command({"hello": 1, "topologyVersion": stale, "maxAwaitTimeMS": 5000})["ok"]
    assert time.monotonic() - start < 4
    raw.close()


def test_exhaust_hello_streams_replies(secantus, start_dvara):
    proxy = start_dvara(secantus.address)
    raw = RawClient(proxy.port)
    tv = _hello(raw)["topologyVersion"]
    request = wire.op_msg({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 300,
                           "$db": "admin"}, flags=wire.EXHAUST_ALLOWED)
    raw.send(request)
    previous = wire.request_id(request)
    for _ in range(3):
        reply = raw.recv_frame()
        assert wire.more_to_come(reply)
        assert wire.response_to(reply) == previous
        assert wire.decode_msg_body(reply)["isWritablePrimary"] is True
        previous = wire.request_id(reply)
    raw.close()


def test_stepdown_reaches_parked_hellos(fresh_secantus, start_dvara):
    admin = f"127.0.0.1:{free_port()}"
    proxy = start_dvara(fresh_secantus.address, "--discovery-interval", "300ms",
                        "--admin-addr", admin)
    with MongoClient(proxy.uri(), serverSelectionTimeoutMS=20000) as client:
        client.admin.command("ping")
        raw = RawClient(proxy.port, timeout=30)
        tv = _hello(raw)["topologyVersion"]
        others = metric_sum(admin, "hello.parked")   # pymongo's own monitor
        raw.send(wire.op_msg({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 20000,
                              "$db": "admin"}))
        wait_until(lambda: metric_sum(admin, "hello.parked") > others,
                   "the hello to park before the set changes")
        try:
            client.admin.command({"replSetStepDown": 2, "force": True})
        except Exception:  # noqa: BLE001 - a stepping-down server may close the connection
            pass
        start = time.monotonic()
        changed = wire.decode_msg_body(raw.recv_frame())
        assert time.monotonic() - start < 10
        assert changed["isWritablePrimary"] is False and changed["secondary"] is True
        assert changed["topologyVersion"]["counter"] > tv["counter"]
        wait_until(lambda: _hello(raw)["isWritablePrimary"], "the primary to return", 30)
        client.stepdown.c.insert_one({"after": True})
        raw.close()
