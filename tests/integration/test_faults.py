"""Faults under load: members killed, hung, restarted, cut off or talking garbage; clients
that vanish or stall; file descriptors running short. dvara stays up, answers or closes
the affected clients within --message-timeout, keeps serving the others, recovers by
itself, and every acknowledged insert is stored exactly once."""

from __future__ import annotations

import json
import os
import re
import resource
import select
import signal
import socket
import struct
import threading
import time
import urllib.request
from typing import Any, Callable, Iterator, Optional

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from dvara_lib import wire
from tests.fault_relay import BLACKHOLE, GARBAGE, PASS, REFUSE, FaultRelay
from tests.helpers import RawClient, Secantus, free_port, wait_until
from tests.mock_rs import MockReplicaSet

MT = 2.0                      # --message-timeout in these tests
SLACK = 1.5                   # scheduling slack on a loaded 2-core machine
MT_ARGS = ("--message-timeout", f"{MT:g}s")
SERVER_SELECTION_MS = 3000
MAX_CONNECTIONS = 4
MONITORING = 1                # dvara's own monitoring connection per member


# -- load and checks -------------------------------------------------------------------

class Load:
    """A few pymongo threads inserting unique _ids (retryable writes) until stopped."""

    def __init__(self, uri: str, threads: int = 4, limit: float = 90.0) -> None:
        self.client = MongoClient(uri, retryWrites=True,
                                  serverSelectionTimeoutMS=SERVER_SELECTION_MS)
        self.coll = self.client.faults.load
        self.attempted: set[str] = set()
        self.acked: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.slowest = 0.0
        self.limit = limit
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                        for t in range(threads)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, t: int) -> None:
        deadline = time.monotonic() + self.limit
        for n in range(100_000):
            if self.halt.is_set() or time.monotonic() > deadline:
                return
            _id = f"{t}-{n}"
            self.attempted.add(_id)
            start = time.monotonic()
            try:
                self.coll.insert_one({"_id": _id})
                self.acked.append((time.monotonic(), _id))
            except PyMongoError as exc:
                self.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                self.halt.wait(0.05)
            self.slowest = max(self.slowest, time.monotonic() - start)

    def wait_acks(self, more: int, after: float = 0.0, timeout: float = 30.0) -> float:
        """Wait for `more` inserts acknowledged after `after`; the first one's time."""
        wait_until(lambda: sum(1 for t, _ in self.acked if t > after) >= more,
                   f"{more} acknowledged inserts", timeout)
        return next(t for t, _ in self.acked if t > after)

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(30)
        self.client.close()

    def check_stored_once(self, direct_uri: str) -> None:
        """Every acknowledged insert is stored, once; nothing unknown is stored."""
        with MongoClient(direct_uri, serverSelectionTimeoutMS=10000) as direct:
            coll = direct.faults.load
            ids = [d["_id"] for d in coll.find({}, {"_id": 1})]
            distinct = set(coll.distinct("_id"))
            assert coll.count_documents({}) == len(ids) == len(distinct)
        acked = {i for _, i in self.acked}
        assert len(acked) == len(self.acked)
        assert acked <= distinct, f"{len(acked - distinct)} acknowledged inserts are missing"
        assert distinct <= self.attempted


def direct_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def insert_frame(doc: dict[str, Any], db: str = "faults", coll: str = "probe") -> bytes:
    return wire.op_msg({"insert": coll, "documents": [doc], "$db": db})


def timed_outcome(client: RawClient, frame: bytes, timeout: float) -> tuple[Any, float]:
    """Send frame; ("closed" | reply document | "no answer", seconds it took)."""
    start = time.monotonic()
    try:
        client.send(frame)
    except OSError:
        return "closed", time.monotonic() - start
    return client.outcome(timeout), time.monotonic() - start


def assert_error_or_closed(outcome: Any, took: float, limit: float = MT + SLACK) -> None:
    assert outcome == "closed" or (isinstance(outcome, dict) and outcome.get("ok") == 0), outcome
    assert took <= limit, f"the affected client waited {took:.2f}s (limit {limit:.1f}s)"


def assert_hello_prompt(port: int, limit: float = 1.0) -> None:
    """The proxy's own hello answers on the listener while the member misbehaves."""
    start = time.monotonic()
    client = RawClient(port, timeout=MT + 5)
    try:
        reply = client.command({"hello": 1})
    finally:
        client.close()
    took = time.monotonic() - start
    assert reply["ok"] == 1.0
    assert took < limit, f"hello took {took:.2f}s"


@pytest.fixture()
def connected_raw(raw_client) -> Callable[[int], RawClient]:
    """connected_raw(port): a raw client that has been served once (its next message uses
    the pool); closed at teardown."""

    def connect(port: int) -> RawClient:
        client = raw_client(port, timeout=MT + 10)
        # (right after a fault, the member may still be marked down for a moment)
        wait_until(lambda: client.command({"ping": 1})["ok"] == 1.0, "a ping to be served")
        return client

    return connect


@pytest.fixture()
def start_load() -> Iterator[Callable[[str], Load]]:
    """start_load(uri): a started Load; stopped (threads joined, client closed) at teardown."""
    loads: list[Load] = []

    def start(uri: str) -> Load:
        load = Load(uri)
        loads.append(load)
        return load.start()

    yield start
    for load in loads:
        load.stop()


def assert_still_up(proxy: Any, pid: int) -> None:
    assert proxy.pid == pid and proxy.proc.poll() is None, proxy.log()[-3000:]
    assert "unexpected error" not in proxy.log(), proxy.log()[-3000:]


def finish_load(load: Load, proxy: Any, pid: int, direct: str, healed: float) -> None:
    """Service recovers by itself after the fault; nothing acknowledged is lost."""
    load.wait_acks(20, after=healed, timeout=30)
    load.stop()
    assert_still_up(proxy, pid)
    bound = 2 * MT + SERVER_SELECTION_MS / 1000 + 3 * SLACK
    assert load.slowest <= bound, f"an insert took {load.slowest:.1f}s"
    load.check_stored_once(direct)


# -- members failing ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_member_killed_or_restarted_under_load(tmp_path, start_dvara, connected_raw,
                                                start_load, how):
    data = ("--storage-path", str(tmp_path / "data"), "--sync-on-commit")
    backend = Secantus(tmp_path, None, *data)
    try:
        proxy = start_dvara(backend.address, *MT_ARGS)
        pid = proxy.pid
        raw = connected_raw(proxy.port)
        load = start_load(proxy.uri())
        load.wait_acks(30)
        backend.stop(getattr(signal, how))
        down = time.monotonic()
        assert_error_or_closed(*timed_outcome(raw, insert_frame({"_id": "raw"}), MT + 10))
        assert_hello_prompt(proxy.port)
        wait_until(lambda: any(t > down for t, _ in load.errors), "the load to see errors", 20)
        backend = Secantus(tmp_path, backend.port, *data)
        finish_load(load, proxy, pid, direct_uri(backend.port), time.monotonic())
    finally:
        backend.stop()


def test_member_hung_by_sigstop_under_load(fresh_secantus, start_dvara, connected_raw,
                                           start_load):
    proxy = start_dvara(fresh_secantus.address, *MT_ARGS)
    pid = proxy.pid
    raws = [connected_raw(proxy.port) for _ in range(3)]
    load = start_load(proxy.uri())
    load.wait_acks(30)
    fresh_secantus.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        for i, raw in enumerate(raws):
            assert_error_or_closed(*timed_outcome(raw, insert_frame({"_id": f"hung-{i}"}),
                                                  MT + 10))
            assert_hello_prompt(proxy.port)
        wait_until(lambda: time.monotonic() > stopped + MT + 1, "the hang to last", MT + 5)
    finally:
        fresh_secantus.send_signal(signal.SIGCONT)
    finish_load(load, proxy, pid, direct_uri(fresh_secantus.port), time.monotonic())
    assert "did not answer within" in proxy.log()


# -- the network between dvara and a member ----------------------------------------------

@pytest.fixture()
def relayed(fresh_secantus, start_dvara):
    """(proxy, relay, backend): dvara reaches the member only through a FaultRelay."""
    relay = FaultRelay(("127.0.0.1", fresh_secantus.port), advertise=True)
    relay.start()
    try:
        proxy = start_dvara(relay.address, *MT_ARGS)
        assert f"proxying member {relay.address}" in proxy.log()
        yield proxy, relay, fresh_secantus
    finally:
        relay.close()


def test_network_drop_under_load(relayed, connected_raw, start_load):
    proxy, relay, backend = relayed
    pid = proxy.pid
    load = start_load(proxy.uri())
    load.wait_acks(30)
    for _ in range(3):                       # connections reset under the load, 3 times
        relay.drop()
        load.wait_acks(10, after=time.monotonic())
    raw = connected_raw(proxy.port)
    relay.set_mode(REFUSE)                   # then the member unreachable for a while
    relay.drop()
    cut = time.monotonic()
    assert_error_or_closed(*timed_outcome(raw, insert_frame({"_id": "cut"}), MT + 10))
    assert_hello_prompt(proxy.port)
    wait_until(lambda: time.monotonic() > cut + MT, "the cut to last", MT + 5)
    relay.set_mode(PASS)
    finish_load(load, proxy, pid, direct_uri(backend.port), time.monotonic())


def test_network_blackhole_under_load(relayed, connected_raw, start_load):
    proxy, relay, backend = relayed
    pid = proxy.pid
    raws = [connected_raw(proxy.port) for _ in range(2)]
    load = start_load(proxy.uri())
    load.wait_acks(30)
    relay.set_mode(BLACKHOLE)
    holed = time.monotonic()
    for i, raw in enumerate(raws):
        assert_error_or_closed(*timed_outcome(raw, insert_frame({"_id": f"hole-{i}"}), MT + 10))
        assert_hello_prompt(proxy.port)
    wait_until(lambda: time.monotonic() > holed + MT + 1, "the blackhole to last", MT + 5)
    relay.set_mode(PASS)
    finish_load(load, proxy, pid, direct_uri(backend.port), time.monotonic())


GARBAGE_REPLIES = {
    "noise": bytes(range(256)) * 2,                                        # length 0x03020100
    "negative length": b"\xff" * 64,
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    "truncated frame": struct.pack("<iiii", 1000, 7, 0, wire.OP_MSG) + b"\x00" * 20,
    "wrong responseTo": wire.op_msg({"ok": 1.0}, resp_to=-42),
}


def test_member_answering_garbage_under_load(relayed, connected_raw, start_load):
    proxy, relay, backend = relayed
    pid = proxy.pid
    load = start_load(proxy.uri())
    load.wait_acks(30)
    for name, garbage in GARBAGE_REPLIES.items():
        raw = connected_raw(proxy.port)
        relay.set_mode(GARBAGE, garbage)
        outcome, took = timed_outcome(raw, insert_frame({"_id": f"garbage {name}"}), MT + 10)
        assert_error_or_closed(outcome, took)
        assert_hello_prompt(proxy.port)
        relay.set_mode(PASS)
        load.wait_acks(5, after=time.monotonic())
        raw.close()
    log = proxy.log()
    assert "outside [16, 48000000]" in log and "server reply answers -42" in log
    finish_load(load, proxy, pid, direct_uri(backend.port), time.monotonic())


def _member_ports(proxy: Any) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"proxying member (\S+) on 127\.0\.0\.1:(\d+)",
                                                proxy.log())}


WORKERS = 4


def test_hung_member_leaves_other_members_clients_alone(start_dvara, connected_raw,
                                                        raw_client):
    """A 2-member set where the secondary hangs on every find, with more clients waiting
    on it than dvara has workers: the hung member never holds every worker, so the
    primary's clients keep their latency and hello answers on both listeners. The
    secondary's clients get an error or are closed: those relayed at once within
    --message-timeout, those that waited for a worker within twice that."""
    rs = MockReplicaSet(["primary", "secondary"])
    release = threading.Event()
    secondary = rs.members[rs.names("secondary")[0]]

    def hang(request: Any) -> bool:
        if (getattr(request, "command_name", "") or "").lower() == "find":
            release.wait(30)
            return request.replies({"ok": 1.0, "cursor": {"id": 0, "ns": "x.y",
                                                          "firstBatch": []}})
        return False

    secondary.server.autoresponds(hang)
    try:
        proxy = start_dvara(rs.primary(), *MT_ARGS, "--workers", str(WORKERS))
        pid = proxy.pid
        ports = wait_until(lambda: len(_member_ports(proxy)) == 2 and _member_ports(proxy),
                           "both members proxied")
        on_primary = connected_raw(ports[rs.primary()])
        stuck = [connected_raw(ports[secondary.name]) for _ in range(3 * WORKERS)]
        find = wire.op_msg({"find": "y", "filter": {}, "$db": "x"})
        results: list[tuple[Any, float]] = []
        threads = [threading.Thread(target=lambda c=c: results.append(
            timed_outcome(c, find, MT + 10))) for c in stuck]
        for thread in threads:
            thread.start()
        latencies = []
        until = time.monotonic() + MT
        while time.monotonic() < until:
            start = time.monotonic()
            assert on_primary.command({"ping": 1})["ok"] == 1.0
            latencies.append(time.monotonic() - start)
        assert_hello_prompt(ports[secondary.name])
        assert_hello_prompt(ports[rs.primary()])
        for thread in threads:
            thread.join(MT + 15)
        assert len(results) == len(stuck)
        for outcome, took in results:
            assert_error_or_closed(outcome, took, limit=2 * MT + SLACK)
        assert sum(took <= MT + SLACK for _, took in results) >= WORKERS - 1
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.05 and latencies[-1] < 0.5, latencies[-5:]
        release.set()
        fresh = raw_client(ports[secondary.name])
        assert wait_until(lambda: fresh.command({"find": "y", "$db": "x"})["ok"] == 1.0,
                          "the secondary to serve again")
        assert_still_up(proxy, pid)
    finally:
        release.set()
        rs.stop()


# -- clients that vanish or stall --------------------------------------------------------

def _admin_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as reply:
        return json.loads(reply.read())


class Bystander:
    """A pymongo client that knows 50 documents by _id and checks every one it reads."""

    def __init__(self, uri: str) -> None:
        self.client = MongoClient(uri, serverSelectionTimeoutMS=10000)
        self.coll = self.client.faults.known
        try:
            self.coll.insert_many([{"_id": i, "v": f"value {i}"} for i in range(50)])
        except BaseException:
            self.client.close()
            raise

    def check(self, rounds: int = 2) -> None:
        for _ in range(rounds):
            for i in range(50):
                assert self.coll.find_one({"_id": i}) == {"_id": i, "v": f"value {i}"}

    def close(self) -> None:
        self.client.close()


@pytest.fixture()
def misbehaved(fresh_secantus, start_dvara):
    """(proxy, backend, admin port, bystander) with a small pool and an admin endpoint."""
    admin = free_port()
    proxy = start_dvara(fresh_secantus.address, *MT_ARGS, "--max-connections",
                        str(MAX_CONNECTIONS), "--workers", "8",
                        "--admin-addr", f"127.0.0.1:{admin}")
    bystander = Bystander(proxy.uri())
    yield proxy, fresh_secantus, admin, bystander
    bystander.close()


def assert_nothing_corrupted_or_leaked(proxy: Any, backend: Secantus, admin: int,
                                       bystander: Bystander) -> None:
    bystander.check()
    wait_until(lambda: backend.connections() <= MAX_CONNECTIONS + MONITORING,
               "the backend to see at most max-connections + monitoring")

    def settled() -> bool:
        status = _admin_status(admin)
        pool = status["members"][0]["pool"]
        return pool["in_use"] == 0 and pool["open"] <= MAX_CONNECTIONS \
            and status["clients"]["busy"] == 0

    wait_until(settled, "the pool to have nothing checked out")
    log = proxy.log()
    assert "server reply answers" not in log, "a server connection was desynchronised"
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]
    assert proxy.proc.poll() is None


def test_clients_that_disconnect_mid_request(misbehaved):
    proxy, backend, admin, bystander = misbehaved
    big = "x" * (4 * 1024 * 1024)
    for i in range(12):
        raw = RawClient(proxy.port)
        frame = insert_frame({"_id": f"big-{i}", "pad": big})
        raw.send(frame if i % 2 == 0 else frame[:len(frame) // 2])   # whole, or half
        raw.close()
    bystander.check()
    assert_nothing_corrupted_or_leaked(proxy, backend, admin, bystander)


def test_clients_that_disconnect_mid_exhaust(misbehaved):
    proxy, backend, admin, bystander = misbehaved
    bystander.client.faults.stream.insert_many([{"_id": i, "pad": "y" * 200}
                                                for i in range(400)])
    for _ in range(8):
        raw = RawClient(proxy.port)
        first = raw.command({"find": "stream", "batchSize": 2}, db="faults")
        cursor_id = first["cursor"]["id"]
        assert cursor_id
        raw.send(wire.op_msg({"getMore": cursor_id, "collection": "stream", "batchSize": 2,
                              "$db": "faults"}, flags=wire.EXHAUST_ALLOWED))
        reply = raw.recv_frame()
        assert wire.more_to_come(reply), "the server did not stream (no exhaust)"
        raw.close()
    assert_nothing_corrupted_or_leaked(proxy, backend, admin, bystander)


def test_clients_that_disconnect_while_pinned(misbehaved):
    proxy, backend, admin, bystander = misbehaved
    clients = []
    for i in range(3 * MAX_CONNECTIONS):
        raw = RawClient(proxy.port)
        raw.send(wire.op_msg({"insert": "pinned", "documents": [{"_id": i}],
                              "writeConcern": {"w": 0}, "$db": "faults"},
                             flags=wire.MORE_TO_COME))
        if i % 3 == 2:    # and some leave half of their next message behind
            raw.send(insert_frame({"_id": "never"}, coll="pinned")[:30])
        clients.append(raw)
        if len(clients) == MAX_CONNECTIONS:
            for c in clients:
                c.close()
            clients = []
    for c in clients:
        c.close()
    pinned = bystander.client.faults.pinned
    wait_until(lambda: pinned.count_documents({}) == 3 * MAX_CONNECTIONS,
               "every w:0 insert to arrive")
    assert pinned.count_documents({"_id": "never"}) == 0
    assert_nothing_corrupted_or_leaked(proxy, backend, admin, bystander)


def test_half_a_message_then_stall(misbehaved):
    proxy, backend, admin, bystander = misbehaved
    threads = proxy.threads()
    before = backend.connections()
    frames = [wire.op_msg({"find": "known", "filter": {"_id": i}, "$db": "faults"})
              for i in range(8)]
    stallers = [RawClient(proxy.port) for _ in frames]
    for raw, frame in zip(stallers, frames):
        raw.send(frame[:len(frame) // 2])
    bystander.check()      # 8 stalled clients, 8 workers: the others are still served
    assert proxy.threads() == threads
    assert backend.connections() <= max(before, MAX_CONNECTIONS + MONITORING)
    for i, (raw, frame) in enumerate(zip(stallers, frames)):
        if i % 2:
            raw.close()
            continue
        raw.send(frame[len(frame) // 2:])
        reply = wire.decode_msg_body(raw.recv_frame())
        assert reply["cursor"]["firstBatch"] == [{"_id": i, "v": f"value {i}"}]
        raw.close()
    assert_nothing_corrupted_or_leaked(proxy, backend, admin, bystander)


def _ping_latencies(client: MongoClient, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.monotonic()
        client.admin.command("ping")
        out.append(time.monotonic() - start)
    return sorted(out)


def test_a_thousand_slow_clients(misbehaved):
    proxy, backend, admin, bystander = misbehaved
    baseline = _ping_latencies(bystander.client, 100)
    threads = proxy.threads()
    frames = [wire.op_msg({"find": "known", "filter": {"_id": i % 50}, "$db": "faults"})
              for i in range(1000)]
    cuts = [(i % 7 + 1) * len(frames[i]) // 8 if i % 5 else 3 for i in range(1000)]
    slow: list[RawClient] = []
    try:
        for frame, cut in zip(frames, cuts):
            slow.append(RawClient(proxy.port, timeout=30))
            slow[-1].send(frame[:cut])
        wait_until(lambda: _admin_status(admin)["clients"]["connected"] >= 1000,
                   "dvara to accept the 1,000 slow clients")
        during = _ping_latencies(bystander.client, 100)
        bystander.check(rounds=1)
        assert proxy.threads() == threads
        assert backend.connections() <= MAX_CONNECTIONS + MONITORING
        p90_before, p90_during = baseline[90], during[90]
        assert p90_during < max(5 * p90_before, 0.05), (baseline[::10], during[::10])
        for i, (raw, frame, cut) in enumerate(zip(slow, frames, cuts)):
            if i % 2 == 0:
                raw.send(frame[cut:])
        for i, raw in enumerate(slow):
            if i % 2 == 0:
                reply = wire.decode_msg_body(raw.recv_frame())
                assert reply["cursor"]["firstBatch"] == [{"_id": i % 50,
                                                          "v": f"value {i % 50}"}]
    finally:
        for raw in slow:
            raw.close()
    assert_nothing_corrupted_or_leaked(proxy, backend, admin, bystander)
    wait_until(lambda: _admin_status(admin)["clients"]["connected"] < 20,
               "dvara to close the slow clients")


# -- file descriptors and client limits ---------------------------------------------------

def _answered(clients: list[RawClient], timeout: float) -> set[int]:
    """Indexes of the clients with a reply waiting, after up to timeout seconds."""
    socks = {c.sock.fileno(): i for i, c in enumerate(clients)}
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(ready) < len(clients) and time.monotonic() < deadline:
        pending = [fd for fd, i in socks.items() if i not in ready]
        readable, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
        ready.update(socks[fd] for fd in readable)
        if not readable:
            break
    return ready


def test_file_descriptors_running_short(secantus, start_dvara, connected_raw):
    proxy = start_dvara(secantus.address, *MT_ARGS)
    pid = proxy.pid
    warm = connected_raw(proxy.port)        # one pooled server connection, kept idle
    limit = 64
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    extra = limit - in_use + 20
    clients = [RawClient(proxy.port, timeout=10) for _ in range(extra)]
    ping = wire.op_msg({"ping": 1, "$db": "admin"})
    for c in clients:
        c.send(ping)
    wait_until(lambda: "Too many open files" in proxy.log(), "accept to fail with EMFILE")
    served = _answered(clients, 3.0)
    assert 0 < len(served) < extra, (len(served), extra)
    assert warm.command({"ping": 1})["ok"] == 1.0
    # Accepted clients are answered: ok, or (no fd for another server connection) an error.
    replies = [wire.reply_document(clients[i].recv_frame()) for i in sorted(served)]
    assert all(r["ok"] == 1.0 or r["code"] == 6 for r in replies), replies
    assert any(r["ok"] == 1.0 for r in replies)
    for i in served:
        clients[i].close()
    waiting = [c for i, c in enumerate(clients) if i not in served]
    later = _answered(waiting, 10.0)         # the backlog is accepted once fds free up
    assert len(later) == len(waiting), (len(later), len(waiting))
    for c in waiting:
        reply = wire.reply_document(c.recv_frame())
        assert reply["ok"] == 1.0 or reply["code"] == 6, reply
        c.close()
    with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
        assert client.admin.command("ping")["ok"] == 1.0
    assert re.search(r"ERROR dvara.acceptor: accept on \S+ failed: .*Too many open files; "
                     r"retrying", proxy.log())
    assert_still_up(proxy, pid)
    warm.close()


def _raw_from(source: str, port: int) -> RawClient:
    """A raw client connecting from another loopback address (another client host)."""
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(source, 0))
    return client


def _served_from(source: str, port: int) -> Optional[RawClient]:
    client = _raw_from(source, port)
    try:
        if client.command({"ping": 1})["ok"] == 1.0:
            return client
    except (OSError, wire.ConnectionFailure):
        pass
    client.close()
    return None


def test_client_limits_reject_cleanly(secantus, start_dvara, connected_raw):
    proxy = start_dvara(secantus.address, "--max-client-connections", "6",
                        "--max-per-client-connections", "3")
    admitted = [connected_raw(proxy.port) for _ in range(3)]
    rejected = [RawClient(proxy.port)]                  # a 4th from 127.0.0.1
    admitted += [_raw_from("127.0.0.2", proxy.port) for _ in range(3)]
    rejected.append(_raw_from("127.0.0.3", proxy.port))  # a 7th in all
    for client in rejected:
        assert client.closed_by_peer(timeout=5)
        client.close()
    for client in admitted:
        assert client.command({"ping": 1})["ok"] == 1.0
    log = proxy.log()
    assert "rejected a client from 127.0.0.1" in log
    assert "--max-per-client-connections reached" in log
    assert "rejected a client from 127.0.0.3" in log
    assert "--max-client-connections reached" in log
    admitted.pop().close()
    newcomer = wait_until(lambda: _served_from("127.0.0.4", proxy.port), "a free slot")
    newcomer.close()
    for client in admitted:
        client.close()
    assert proxy.proc.poll() is None
