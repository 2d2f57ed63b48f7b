"""--processes 2: worker processes that together behave as one dvara (SecantusDB)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from dvara_lib import wire
from tests.helpers import Dvara, RawClient, free_port, metric_sum, wait_until
from tests.integration.test_restart import Load, _alive, _pid, _stop_current


def _workers(pid: int) -> list[int]:
    """The pids of dvara pid's worker processes."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"dvara_lib.process.worker" in cmdline and _alive(int(entry)):
            out.append(int(entry))
    return sorted(out)


def _get(admin: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as reply:
        body = reply.read().decode()
    return json.loads(body) if path == "/status" else body


def _hello(raw: RawClient) -> dict[str, Any]:
    return raw.command({"hello": 1})


@pytest.fixture()
def two(fresh_secantus, start_dvara):
    """(dvara with 2 worker processes and an admin endpoint, its admin address, backend)."""
    admin = f"127.0.0.1:{free_port()}"
    proxy = start_dvara(fresh_secantus.address, "--processes", "2", "--max-connections", "3",
                        "--admin-addr", admin)
    wait_until(lambda: len(_workers(proxy.pid)) == 2, "two worker processes")
    return proxy, admin, fresh_secantus


def test_two_processes_answer_as_one_server(two):
    proxy, admin, _ = two
    raws = [RawClient(proxy.port) for _ in range(16)]
    try:
        hellos = [_hello(raw) for raw in raws]
        ids = [h["connectionId"] for h in hellos]
        assert len(set(ids)) == len(ids)                       # unique across processes
        assert {i % 2 for i in ids} == {0, 1}                  # and both processes serve
        versions = {(str(h["topologyVersion"]["processId"]), h["topologyVersion"]["counter"])
                    for h in hellos}
        assert len(versions) == 1                              # one server to drivers
        before = metric_sum(admin, "requests")
        for raw in raws:
            assert raw.command({"ping": 1})["ok"] == 1.0
        wait_until(lambda: metric_sum(admin, "requests") - before >= len(raws),
                   "the pings counted over both processes")
        status = _get(admin, "/status")
        assert status["processes"] == 2 and status["clients"]["connected"] == len(raws)
        assert status["members"][0]["clients"] == len(raws)
        assert status["members"][0]["pool"]["max"] == 3        # 2 + 1: the total
    finally:
        for raw in raws:
            raw.close()


def test_the_pool_bound_holds_for_the_whole_dvara(two):
    proxy, admin, backend = two
    seen: list[int] = []
    halt = threading.Event()

    def sample() -> None:
        while not halt.is_set():
            seen.append(backend.connections())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with MongoClient(proxy.uri(), maxPoolSize=40, serverSelectionTimeoutMS=20000) as client:
            client.procs.c.insert_many([{"_id": i} for i in range(200)])
            errors: list[Exception] = []

            def reads() -> None:
                for i in range(30):
                    try:
                        list(client.procs.c.find({"_id": {"$gte": i}}).limit(50))
                    except Exception as exc:  # noqa: BLE001 - collected and asserted below
                        errors.append(exc)

            threads = [threading.Thread(target=reads) for _ in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors[:3]
    finally:
        halt.set()
        sampler.join(10)
    assert max(seen) <= 3 + 1, max(seen)          # 3 pooled + the parent's one monitor
    status = _get(admin, "/status")["members"][0]["pool"]
    assert status["open"] <= 3 and status["in_use"] == 0


def test_a_killed_worker_is_replaced_and_the_other_serves_on(two):
    proxy, admin, _ = two
    raws = [RawClient(proxy.port, timeout=10) for _ in range(12)]
    try:
        by_worker: dict[int, list[RawClient]] = {0: [], 1: []}
        for raw in raws:                 # worker i hands out ids i + 1, i + 3, ...
            by_worker[(_hello(raw)["connectionId"] - 1) % 2].append(raw)
        assert by_worker[0] and by_worker[1]
        workers = {w["index"]: w["pid"] for w in _get(admin, "/status")["workers"]}
        assert sorted(workers.values()) == _workers(proxy.pid)
        os.kill(workers[1], signal.SIGKILL)
        wait_until(lambda: len(_workers(proxy.pid)) == 2 and workers[1] not in
                   _workers(proxy.pid), "a new worker in place of the killed one", 30)
        for raw in by_worker[1]:         # its clients are lost ...
            assert raw.closed_by_peer()
        for raw in by_worker[0]:         # ... the other worker's are not
            assert raw.command({"ping": 1})["ok"] == 1.0
        fresh = [RawClient(proxy.port) for _ in range(8)]
        try:
            assert all(raw.command({"ping": 1})["ok"] == 1.0 for raw in fresh)
            wait_until(lambda: all(w["clients"] is not None
                                   for w in _get(admin, "/status")["workers"]),
                       "both workers to report")
        finally:
            for raw in fresh:
                raw.close()
        assert "exited with status" in proxy.log() and "starting it again" in proxy.log()
    finally:
        for raw in raws:
            raw.close()


def test_a_stepdown_reaches_parked_hellos_in_every_process(two):
    proxy, admin, backend = two
    raws = [RawClient(proxy.port, timeout=30) for _ in range(8)]
    try:
        first = [_hello(raw) for raw in raws]
        assert {(h["connectionId"] - 1) % 2 for h in first} == {0, 1}
        for raw, hello in zip(raws, first):
            raw.send(wire.op_msg({"hello": 1, "topologyVersion": hello["topologyVersion"],
                                  "maxAwaitTimeMS": 20000, "$db": "admin"}))
        wait_until(lambda: metric_sum(admin, "hello.parked") == len(raws),
                   "the hellos to park before the set changes")
        with MongoClient(f"mongodb://{backend.address}/?directConnection=true") as direct:
            try:
                direct.admin.command({"replSetStepDown": 2, "force": True})
            except Exception:  # noqa: BLE001 - a stepping-down server may close connections
                pass
        started = time.monotonic()
        for raw, hello in zip(raws, first):
            changed = wire.decode_msg_body(raw.recv_frame())
            assert changed["topologyVersion"]["counter"] > hello["topologyVersion"]["counter"]
        assert time.monotonic() - started < 10
        counters = set()
        for raw in raws:
            counters.add(_hello(raw)["topologyVersion"]["counter"])
        assert len(counters) == 1                 # every process says the same
    finally:
        for raw in raws:
            raw.close()


def test_sighup_reaches_every_worker(fresh_secantus, tmp_path: Path):
    conf = tmp_path / "dvara.conf"
    admin = f"127.0.0.1:{free_port()}"
    conf.write_text(f"processes = 2\nmax-connections = 4\nadmin-addr = {admin}\n")
    proxy = Dvara(tmp_path, fresh_secantus.address, "-c", str(conf))
    try:
        assert _get(admin, "/status")["members"][0]["pool"]["max"] == 4
        conf.write_text(f"processes = 2\nmax-connections = 7\nadmin-addr = {admin}\n")
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: _get(admin, "/status")["members"][0]["pool"]["max"] == 7,
                   "both workers to take the new limit (3 + 4)")
    finally:
        proxy.stop()


def test_sigterm_and_restart_with_two_workers(secantus, tmp_path: Path):
    pidfile = tmp_path / "dvara.pid"
    proxy = Dvara(tmp_path, secantus.address, "--processes", "2", "--pidfile", str(pidfile),
                  "--max-connections", "4", "--graceful-timeout", "20s")
    idle = [RawClient(proxy.port, timeout=30) for _ in range(6)]
    try:
        for raw in idle:
            assert raw.command({"ping": 1})["ok"] == 1.0
        old, old_workers = proxy.pid, _workers(proxy.pid)
        with MongoClient(proxy.uri(retryWrites="true"), serverSelectionTimeoutMS=30000) as client, \
                Load(client, 8) as load:
            wait_until(lambda: len(load.acked) > 50, "load to run", 60)
            proxy.send_signal(signal.SIGUSR2)
            new = wait_until(lambda: _pid(pidfile) not in (0, old) and _pid(pidfile),
                             "a new dvara in the pidfile", 60)
            wait_until(lambda: not _alive(old), "the old dvara to exit", 60)
            assert all(not _alive(w) for w in old_workers)
            wait_until(lambda: len(_workers(new)) == 2, "the new dvara's workers")
            wait_until(lambda: len(load.acked) > 150, "load to run on", 60)
            load.halt.set()
        assert load.failed == [], load.failed[:3]
        for raw in idle:                          # idle clients moved, still served
            assert raw.command({"ping": 1})["ok"] == 1.0
        workers = _workers(new)
        os.kill(new, signal.SIGTERM)
        wait_until(lambda: not _alive(new), "the new dvara to stop", 40)
        assert all(not _alive(w) for w in workers)
    finally:
        for raw in idle:
            raw.close()
        _stop_current(pidfile, proxy)
