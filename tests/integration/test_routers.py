"""The routers mode: dvara in front of mongos routers (test routers over one SecantusDB)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from pymongo import MongoClient

from dvara_lib import wire
from tests.helpers import Dvara, RawClient, Router, Secantus, free_port, wait_until
from tests.integration.test_processes import _get
from tests.integration.test_restart import Load
from tests.router_peer import read_log

pytestmark = pytest.mark.timeout(120)


class Cluster:
    """Three test routers over one SecantusDB, and dvara in front of them."""

    def __init__(self, tmp: Path, secantus: Secantus, *dvara_args: str, ports: int = 3) -> None:
        self.log = tmp / f"requests-{uuid.uuid4().hex}.log"
        self.secantus = secantus
        self.routers: list[Router] = []
        self.proxy: Dvara | None = None
        self.admin = f"127.0.0.1:{free_port()}"
        try:
            self.routers = [Router(tmp, secantus.address, f"r{i}", self.log) for i in range(3)]
            self.proxy = Dvara(tmp, ",".join(r.address for r in self.routers), *dvara_args,
                               "--admin-addr", self.admin, ports=ports)
        except BaseException:
            self.close()
            raise

    def client(self, **options: object) -> MongoClient:
        return MongoClient(self.proxy.uri(), serverSelectionTimeoutMS=10000, **options)

    def requests(self) -> list[dict]:
        return read_log(self.log)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for router in self.routers:
            router.stop()


@pytest.fixture(scope="module")
def cluster(secantus: Secantus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("routers"), secantus)
    yield made
    made.close()


@pytest.fixture()
def client(cluster: Cluster) -> Iterator[MongoClient]:
    with cluster.client() as made:
        yield made


def _proxy_ports(cluster: Cluster) -> set[tuple[str, int]]:
    return {("127.0.0.1", cluster.proxy.port + i) for i in range(3)}


def test_drivers_see_a_sharded_cluster_of_the_proxy_ports(cluster: Cluster,
                                                          client: MongoClient) -> None:
    assert cluster.proxy.uri() == "mongodb://" + ",".join(
        f"127.0.0.1:{cluster.proxy.port + i}" for i in range(3)) + "/"
    client.admin.command("ping")
    wait_until(lambda: len(client.nodes) == 3, "the three router ports known")
    description = client.topology_description
    assert description.topology_type_name == "Sharded"
    servers = description.server_descriptions()
    assert set(servers) == _proxy_ports(cluster)
    assert {s.server_type_name for s in servers.values()} == {"Mongos"}
    status = _get(cluster.admin, "/status")
    assert status["routers"] is True and status["set_name"] is None
    assert [m["state"] for m in status["members"]] == ["ROUTER"] * 3
    assert [m["member"] for m in status["members"]] == [r.address for r in cluster.routers]


def test_crud_and_the_load_is_spread_over_the_routers(cluster: Cluster,
                                                      client: MongoClient) -> None:
    coll = client.routers.crud
    coll.drop()
    before = len(cluster.requests())
    for i in range(150):
        coll.insert_one({"_id": i, "n": i})
    assert coll.update_many({"n": {"$lt": 50}}, {"$set": {"low": True}}).modified_count == 50
    assert coll.delete_many({"n": {"$gte": 100}}).deleted_count == 50
    assert coll.count_documents({}) == 100 and coll.count_documents({"low": True}) == 50
    inserts = [r for r in cluster.requests()[before:] if r["cmd"] == "insert"]
    assert len(inserts) == 150
    assert {r["router"] for r in inserts} == {"r0", "r1", "r2"}
    assert all(r["txn"] for r in inserts)          # retryable writes: each has a txnNumber


def test_every_getmore_of_a_cursor_goes_to_the_router_that_opened_it(
        cluster: Cluster, client: MongoClient) -> None:
    coll = client.routers.cursor
    coll.drop()
    coll.insert_many([{"_id": i} for i in range(100)])
    for _ in range(3):
        cursor = coll.find(batch_size=5).sort("_id", 1)
        first = next(cursor)
        cursor_id = cursor.cursor_id
        assert [first["_id"]] + [d["_id"] for d in cursor] == list(range(100))
        served = [r["router"] for r in cluster.requests() if r.get("cursor") == cursor_id]
        assert len(served) >= 19 and len(set(served)) == 1


def test_transactions_commit_and_abort_through_one_router(cluster: Cluster,
                                                          client: MongoClient) -> None:
    coll = client.routers.txn
    coll.drop()
    coll.insert_one({"_id": "seed"})
    before = len(cluster.requests())
    with client.start_session() as session:
        with session.start_transaction():
            coll.insert_one({"_id": "a"}, session=session)
            coll.update_one({"_id": "seed"}, {"$set": {"x": 1}}, session=session)
        with pytest.raises(RuntimeError):
            with session.start_transaction():
                coll.insert_one({"_id": "b"}, session=session)
                raise RuntimeError("abort it")
    assert sorted(d["_id"] for d in coll.find()) == ["a", "seed"]
    assert coll.find_one({"_id": "seed"})["x"] == 1
    in_txn = [r for r in cluster.requests()[before:]
              if r["cmd"] in ("insert", "update", "commitTransaction", "abortTransaction")]
    assert [r["cmd"] for r in in_txn] == ["insert", "update", "commitTransaction",
                                          "insert", "abortTransaction"]
    first, second = in_txn[:3], in_txn[3:]
    assert len({r["router"] for r in first}) == 1 and len({r["router"] for r in second}) == 1


def test_mixed_seeds_exit_with_a_clear_error(secantus: Secantus, tmp_path: Path) -> None:
    with Router(tmp_path, secantus.address, "solo", tmp_path / "solo.log") as router:
        proxy = Dvara(tmp_path, f"{router.address},{secantus.address}", wait=False)
        try:
            assert proxy.proc.wait(30) == 1
        finally:
            proxy.stop()
    assert (f"mixed seeds: {router.address} answered as mongos router(s), but "
            f"{secantus.address} is a member of replica set") in proxy.log()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_killed_router_loses_no_acknowledged_write_and_the_load_moves_on(
        fresh_secantus: Secantus, tmp_path: Path, processes: str) -> None:
    cluster = Cluster(tmp_path, fresh_secantus, "--processes", processes)
    try:
        with cluster.client() as client:
            client.admin.command("ping")
            wait_until(lambda: len(client.nodes) == 3, "the three router ports known")
            victim = cluster.routers[0]
            load, after = _kill_mid_load(cluster, client, threads=4)
            assert {r["router"] for r in after if r["cmd"] == "insert"} == {"r1", "r2"}
            wait_until(lambda: _states(cluster) == ["DOWN", "ROUTER", "ROUTER"],
                       "the killed router shown down")
            _fails_fast(_port_of(cluster.proxy, victim.address))
        _no_acknowledged_write_lost(fresh_secantus, load)
    finally:
        cluster.close()


def _kill_mid_load(cluster: Cluster, client: MongoClient,
                   threads: int) -> tuple[Load, list[dict]]:
    """Insert from threads, SIGKILL the first router while it serves, go on until 300
    more inserts are acknowledged: the load, and the requests relayed after the kill."""
    victim = cluster.routers[0]
    with Load(client, threads=threads) as load:
        wait_until(lambda: len([r for r in cluster.requests()
                                if r["router"] == victim.name]) >= 20,
                   "the victim router serving inserts", timeout=30)
        victim.stop(signal.SIGKILL)
        killed_at = len(cluster.requests())
        acked_at_kill = len(load.acked)
        wait_until(lambda: len(load.acked) >= acked_at_kill + 300,
                   "300 more inserts acknowledged after the kill", timeout=30)
    return load, cluster.requests()[killed_at:]


def _no_acknowledged_write_lost(secantus: Secantus, load: Load) -> None:
    with MongoClient(secantus.address, directConnection=True) as direct:
        stored = {d["_id"] for d in direct.restart.docs.find({}, {"_id": 1})}
    assert set(load.acked) <= stored
    assert len(load.failed) <= 20, load.failed[:5]


def _fails_fast(port: int) -> None:
    """The port of a router that is down: a command gets HostUnreachable at once, a hello
    no answer (its connection is closed)."""
    with RawClient(port) as raw:
        started = time.monotonic()
        reply = raw.command({"ping": 1})
        assert reply["codeName"] == "HostUnreachable" and time.monotonic() - started < 3
    with RawClient(port) as raw:
        raw.send(wire.op_msg({"hello": 1, "$db": "admin"}))
        assert raw.outcome(timeout=3) == "closed"


def _states(cluster: Cluster) -> list[str]:
    return [m["state"] for m in _get(cluster.admin, "/status")["members"]]


def test_a_router_down_at_start_gets_its_port_and_serves_once_it_answers(
        secantus: Secantus, tmp_path: Path) -> None:
    log = tmp_path / "late.log"
    late_port = free_port()
    with Router(tmp_path, secantus.address, "early", log) as early:
        proxy = Dvara(tmp_path, f"{early.address},127.0.0.1:{late_port}", ports=2)
        try:
            assert proxy.uri() == (f"mongodb://127.0.0.1:{proxy.port},"
                                   f"127.0.0.1:{proxy.port + 1}/")
            late = ("127.0.0.1", proxy.port + 1)
            with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000,
                             heartbeatFrequencyMS=500) as client:
                client.routers.late.insert_one({"_id": "early"})
                assert _server_type(client, late) == "Unknown"
                with RawClient(late[1]) as raw:     # checked, never answered: closed at once
                    raw.send(wire.op_msg({"hello": 1, "$db": "admin"}))
                    assert raw.outcome(timeout=2) == "closed"
                with Router(tmp_path, secantus.address, "late", log, port=late_port):
                    wait_until(lambda: _server_type(client, late) == "Mongos",
                               "the late router seen as a mongos", 20)
                    for i in range(60):
                        client.routers.late.insert_one({"_id": i})
                    served = {r["router"] for r in read_log(log) if r["cmd"] == "insert"}
                    assert served == {"early", "late"}
        finally:
            proxy.stop()


def _server_type(client: MongoClient, address: tuple[str, int]) -> str:
    return client.topology_description.server_descriptions()[address].server_type_name


def test_routers_keep_their_ports_across_a_restart_with_the_state_file(
        secantus: Secantus, tmp_path: Path) -> None:
    state = tmp_path / "ports.json"
    routers = [Router(tmp_path, secantus.address, f"s{i}", tmp_path / "s.log") for i in range(3)]
    try:
        first = Dvara(tmp_path, ",".join(r.address for r in routers), "--state-file", str(state))
        ports = {r.address: _port_of(first, r.address) for r in routers}
        first.stop()
        reordered = [routers[2], routers[0]]
        again = tmp_path / "again"          # a log of its own
        again.mkdir()
        second = Dvara(again, ",".join(r.address for r in reordered), "--state-file",
                       str(state), port_start=first.port_start)
        try:
            assert {r.address: _port_of(second, r.address) for r in reordered} == {
                r.address: ports[r.address] for r in reordered}
            assert second.uri() == "mongodb://" + ",".join(
                f"127.0.0.1:{ports[r.address]}" for r in reordered) + "/"
        finally:
            second.stop()
    finally:
        for router in routers:
            router.stop()


def _port_of(proxy: Dvara, real: str) -> int:
    line = next(l for l in proxy.log().splitlines() if f"proxying member {real} on" in l)
    return int(line.rsplit(":", 1)[1])


# -- --load-balanced ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def balanced(secantus: Secantus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("balanced"), secantus, "--load-balanced", ports=4)
    yield made
    made.close()


def test_load_balanced_drivers_spread_over_the_routers_one_connection_one_router(
        balanced: Cluster) -> None:
    assert balanced.proxy.uri() == f"mongodb://127.0.0.1:{balanced.proxy.port}/?loadBalanced=true"
    clients = [balanced.client(maxPoolSize=1) for _ in range(3)]
    try:
        assert clients[0].topology_description.topology_type_name == "LoadBalanced"
        before = len(balanced.requests())
        for n, client in enumerate(clients):
            for i in range(5):
                client.routers.balanced.insert_one({"client": n, "i": i})
        inserts = [r["router"] for r in balanced.requests()[before:] if r["cmd"] == "insert"]
        assert len(inserts) == 15
        per_client = [inserts[n * 5:(n + 1) * 5] for n in range(3)]
        assert all(len(set(served)) == 1 for served in per_client)   # one connection, one router
        assert {served[0] for served in per_client} == {"r0", "r1", "r2"}   # least loaded
    finally:
        for client in clients:
            client.close()


def test_load_balanced_cursors_and_transactions_stay_on_one_router(balanced: Cluster) -> None:
    with balanced.client(maxPoolSize=4) as client:
        coll = client.routers.lb_cursor
        coll.drop()
        coll.insert_many([{"_id": i} for i in range(60)])
        cursors = [coll.find(batch_size=4).sort("_id", 1) for _ in range(3)]
        firsts = [next(cursor) for cursor in cursors]       # three cursors open at once
        for first, cursor in zip(firsts, cursors):
            cursor_id = cursor.cursor_id
            assert [first["_id"]] + [d["_id"] for d in cursor] == list(range(60))
            served = [r["router"] for r in balanced.requests() if r.get("cursor") == cursor_id]
            assert len(served) >= 14 and len(set(served)) == 1
        before = len(balanced.requests())
        with client.start_session() as session:
            with session.start_transaction():
                for i in range(5):
                    coll.insert_one({"_id": f"t{i}"}, session=session)
        in_txn = [r for r in balanced.requests()[before:]
                  if r["cmd"] in ("insert", "commitTransaction")]
        assert len(in_txn) == 6 and len({r["router"] for r in in_txn}) == 1
        assert coll.count_documents({"_id": {"$regex": "^t"}}) == 5


def test_load_balanced_a_killed_router_loses_no_acknowledged_write(
        fresh_secantus: Secantus, tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, fresh_secantus, "--load-balanced", ports=4)
    try:
        with cluster.client(maxPoolSize=6) as client:
            load, after = _kill_mid_load(cluster, client, threads=6)
            assert {r["router"] for r in after if r["cmd"] == "insert"} == {"r1", "r2"}
            wait_until(lambda: _states(cluster)[0] == "DOWN", "the killed router shown down")
        _no_acknowledged_write_lost(fresh_secantus, load)
    finally:
        cluster.close()


def test_load_balanced_needs_routers(secantus: Secantus, tmp_path: Path) -> None:
    proxy = Dvara(tmp_path, secantus.address, "--load-balanced", wait=False)
    try:
        assert proxy.proc.wait(30) != 0
    finally:
        proxy.stop()
    assert "--load-balanced: the seeds are not mongos routers" in proxy.log()
