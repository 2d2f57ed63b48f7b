"""The bounded LIFO pool of dvara_lib.backend.pool, over socketpair() connections."""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Iterator, Optional

import pytest

from dvara_lib import wire
from dvara_lib.errors import ConnectionFailure, PoolTimeout, ServerTimeout
from dvara_lib.backend.pool import Pool, PoolStats, ServerConnection
from tests.helpers import wait_until

SLACK = 0.05


class FakeConnector:
    """Returns one end of a fresh socketpair per call; keeps both ends to close them later."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mine: list[socket.socket] = []
        self.theirs: list[socket.socket] = []
        self.fail: Optional[BaseException] = None
        self.gate: Optional[threading.Event] = None
        self.calls = 0

    def __call__(self) -> socket.socket:
        with self.lock:
            self.calls += 1
            gate, fail = self.gate, self.fail
        if gate is not None:
            gate.wait(5)
        if fail is not None:
            raise fail
        a, b = socket.socketpair()
        with self.lock:
            self.mine.append(a)
            self.theirs.append(b)
        return a

    @property
    def opened(self) -> int:
        return len(self.mine)

    @property
    def live(self) -> int:
        """Sockets handed to the pool and not closed by it."""
        with self.lock:
            return sum(1 for s in self.mine if s.fileno() != -1)

    def close(self) -> None:
        for s in self.mine + self.theirs:
            s.close()


class RecordingStats(PoolStats):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list[float]] = {
            "created": [], "closed": [], "checkout_wait": [], "checkout_timeout": [], "held": []}

    def _add(self, name: str, value: float = 0.0) -> None:
        with self.lock:
            self.calls[name].append(value)

    def created(self) -> None:
        self._add("created")

    def closed(self) -> None:
        self._add("closed")

    def checkout_wait(self, seconds: float) -> None:
        self._add("checkout_wait", seconds)

    def checkout_timeout(self) -> None:
        self._add("checkout_timeout")

    def held(self, seconds: float) -> None:
        self._add("held", seconds)

    def count(self, name: str) -> int:
        return len(self.calls[name])


@pytest.fixture
def connector() -> Iterator[FakeConnector]:
    fake = FakeConnector()
    yield fake
    fake.close()


@pytest.fixture
def stats() -> RecordingStats:
    return RecordingStats()


@pytest.fixture
def make_pool(connector: FakeConnector, stats: RecordingStats) -> Iterator:
    pools: list[Pool] = []

    def make(max_size: int = 3, **kwargs) -> Pool:
        pool = Pool("db1.example:27017", connector, max_size, stats=stats, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def numbers(pool: Pool) -> tuple[int, int, int]:
    return pool.open_count, pool.in_use, pool.waiting


# --- checkout / checkin ----------------------------------------------------------------------

def test_checkout_opens_then_reuses_last_in_first_out(make_pool, connector):
    pool = make_pool(max_size=3)
    a, b, c = (pool.checkout(1) for _ in range(3))
    assert connector.calls == 3 and len({a.id, b.id, c.id}) == 3
    assert numbers(pool) == (3, 3, 0)
    for conn in (a, b, c):
        pool.checkin(conn)
    assert numbers(pool) == (3, 0, 0)
    assert pool.checkout(1) is c
    assert pool.checkout(1) is b
    pool.checkin(b)
    assert pool.checkout(1) is b
    assert connector.calls == 3


def test_a_checked_out_connection_talks_to_its_socket(make_pool, connector):
    pool = make_pool()
    conn = pool.checkout(1)
    assert isinstance(conn, ServerConnection) and conn.generation == 0
    frame = wire.op_msg({"ping": 1})
    conn.send(frame)
    assert wire.read_frame(connector.theirs[0]) == frame
    connector.theirs[0].sendall(frame)
    assert conn.read_frame() == frame
    pool.checkin(conn)


@pytest.fixture
def conn_pair() -> Iterator[tuple[ServerConnection, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ServerConnection(ours, 0), theirs
    ours.close()
    theirs.close()


def test_a_server_that_does_not_answer_in_time_is_a_server_timeout(conn_pair):
    conn, _ = conn_pair
    wire.set_recv_timeout(conn.sock, 0.05)     # as the connector sets --message-timeout
    with pytest.raises(ServerTimeout, match="timed out reading"):
        conn.read_frame()


def test_a_server_that_hangs_up_is_a_connection_failure(conn_pair):
    conn, theirs = conn_pair
    theirs.close()
    with pytest.raises(ConnectionFailure, match="closed by server"):
        conn.read_frame()
    with pytest.raises(ConnectionFailure, match="write failed"):
        for _ in range(100):
            conn.send(wire.op_msg({"x": "y" * 10000}))


def test_a_reply_in_pieces_is_read_whole(conn_pair):
    conn, theirs = conn_pair
    reply = wire.op_msg({"ok": 1.0, "pad": "z" * 100})
    theirs.sendall(reply[:7])
    threading.Timer(0.05, theirs.sendall, (reply[7:] + reply,)).start()
    assert conn.read_frame() == reply
    assert conn.read_frame() == reply           # the next one, read past the first


def test_checkout_times_out_when_the_pool_is_full(make_pool, stats):
    pool = make_pool(max_size=2)
    held = [pool.checkout(1), pool.checkout(1)]
    start = time.monotonic()
    with pytest.raises(PoolTimeout, match="2 in use"):
        pool.checkout(0.3)
    elapsed = time.monotonic() - start
    assert 0.3 - SLACK <= elapsed < 5
    assert stats.count("checkout_timeout") == 1
    assert numbers(pool) == (2, 2, 0)
    for conn in held:
        pool.checkin(conn)


def test_checkout_with_zero_timeout_fails_at_once_when_full(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.checkout(1)
    with pytest.raises(PoolTimeout):
        pool.checkout(0)
    pool.checkin(conn)
    assert pool.checkout(0) is conn
    pool.checkin(conn)


def test_a_waiter_is_woken_by_a_checkin_from_another_thread(make_pool, stats):
    pool = make_pool(max_size=1)
    conn = pool.checkout(1)
    got: list[ServerConnection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout(5)), daemon=True)
    start = time.monotonic()
    waiter.start()
    wait_until(lambda: pool.waiting == 1, "the waiter to block")
    assert numbers(pool) == (1, 1, 1)
    pool.checkin(conn)
    waiter.join(5)
    assert got == [conn]
    assert time.monotonic() - start < 5
    assert numbers(pool) == (1, 1, 0)
    assert stats.calls["checkout_wait"][-1] >= 0.05 - SLACK
    pool.checkin(conn)


def test_checkin_not_reusable_closes_and_frees_the_slot(make_pool, connector, stats):
    pool = make_pool(max_size=1)
    conn = pool.checkout(1)
    pool.checkin(conn, reusable=False)
    assert conn.closed and conn.sock.fileno() == -1
    assert numbers(pool) == (0, 0, 0)
    assert stats.count("closed") == 1
    other = pool.checkout(0)
    assert other is not conn and connector.calls == 2
    pool.checkin(other)


def test_checkin_of_a_closed_connection_does_not_keep_it(make_pool, stats):
    pool = make_pool(max_size=1)
    conn = pool.checkout(1)
    conn.close()
    pool.checkin(conn)
    assert numbers(pool) == (0, 0, 0)
    assert pool.checkout(0) is not conn


def test_clear_bumps_generation_and_retires_old_connections(make_pool, connector, stats):
    pool = make_pool(max_size=3)
    idle, out = pool.checkout(1), pool.checkout(1)
    pool.checkin(idle)
    pool.clear()
    assert pool.generation == 1
    assert idle.closed and not out.closed
    assert numbers(pool) == (1, 1, 0)
    assert stats.count("closed") == 1
    pool.checkin(out)
    assert out.closed
    assert numbers(pool) == (0, 0, 0)
    assert stats.count("closed") == 2
    fresh = pool.checkout(1)
    assert fresh.generation == 1 and fresh not in (idle, out)
    pool.checkin(fresh)
    assert not fresh.closed and numbers(pool) == (1, 0, 0)


def test_checkout_idle_takes_the_last_idle_one_without_waiting_or_recording(make_pool, stats):
    """The relay's fast path: an idle connection or None at once, nothing recorded."""
    pool = make_pool(max_size=2)
    assert pool.checkout_idle() is None                 # none idle: never opens one
    a, b = pool.checkout(1), pool.checkout(1)
    pool.checkin(a)
    pool.checkin(b)
    recorded = {name: stats.count(name) for name in stats.calls}
    conn = pool.checkout_idle()
    assert conn is b and numbers(pool) == (2, 1, 0)
    conn.spoil()                                        # a taken connection starts sound
    pool.checkin_idle(conn, time.monotonic())
    assert pool.checkout_idle() is b and not b.spoiled
    pool.checkin_idle(b, time.monotonic())
    assert numbers(pool) == (2, 0, 0) and not b.closed
    assert {name: stats.count(name) for name in stats.calls} == recorded


def test_checkin_idle_leaves_the_unusual_to_checkin(make_pool, stats):
    """A connection of an older generation is closed; a waiter is woken."""
    pool = make_pool(max_size=1)
    pool.checkin(pool.checkout(1))
    stale = pool.checkout_idle()
    pool.clear()
    pool.checkin_idle(stale, time.monotonic())
    assert stale.closed and numbers(pool) == (0, 0, 0)
    pool.checkin(pool.checkout(1))
    conn = pool.checkout_idle()
    got: list[ServerConnection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout(5)), daemon=True)
    waiter.start()
    wait_until(lambda: pool.waiting == 1, "the waiter to block")
    pool.checkin_idle(conn, time.monotonic())
    waiter.join(5)
    assert got == [conn]
    pool.checkin(conn)


def test_checkout_idle_of_a_closed_pool_is_none(make_pool):
    pool = make_pool(max_size=1)
    pool.checkin(pool.checkout(1))
    pool.close()
    assert pool.checkout_idle() is None


def test_clear_during_connect_retires_the_new_connection_on_checkin(make_pool, connector):
    pool = make_pool(max_size=1)
    connector.gate = threading.Event()
    got: list[ServerConnection] = []
    opener = threading.Thread(target=lambda: got.append(pool.checkout(5)), daemon=True)
    opener.start()
    wait_until(lambda: connector.calls == 1, "the connector to be called")
    pool.clear()
    connector.gate.set()
    opener.join(5)
    [conn] = got
    assert conn.generation == 0
    pool.checkin(conn)
    assert conn.closed and pool.open_count == 0


@pytest.mark.parametrize("error", [ConnectionFailure("refused"), OSError("boom")])
def test_connector_failure_frees_the_reserved_slot(make_pool, connector, stats, error):
    pool = make_pool(max_size=1)
    connector.fail = error
    with pytest.raises(type(error)):
        pool.checkout(1)
    assert numbers(pool) == (0, 0, 0)
    assert stats.count("created") == 0
    connector.fail = None
    conn = pool.checkout(0)
    assert numbers(pool) == (1, 1, 0)
    pool.checkin(conn)


def test_connector_failure_wakes_a_waiter(make_pool, connector):
    pool = make_pool(max_size=1)
    gate = connector.gate = threading.Event()
    connector.fail = ConnectionFailure("refused")  # the first call, blocked on gate, fails
    errors: list[BaseException] = []
    got: list[ServerConnection] = []

    def failing_checkout() -> None:
        try:
            pool.checkout(5)
        except ConnectionFailure as exc:
            errors.append(exc)

    first = threading.Thread(target=failing_checkout, daemon=True)
    first.start()
    wait_until(lambda: connector.calls == 1, "the first connect")
    second = threading.Thread(target=lambda: got.append(pool.checkout(5)), daemon=True)
    second.start()
    wait_until(lambda: pool.waiting == 1, "the second checkout to wait")
    connector.gate = connector.fail = None  # later calls succeed at once
    gate.set()
    first.join(5)
    second.join(5)
    assert len(errors) == 1 and len(got) == 1
    assert connector.calls == 2 and numbers(pool) == (1, 1, 0)
    pool.checkin(got[0])


def test_close_retires_idle_and_refuses_checkouts(make_pool, stats):
    pool = make_pool(max_size=2)
    idle, out = pool.checkout(1), pool.checkout(1)
    pool.checkin(idle)
    pool.close()
    assert idle.closed
    with pytest.raises(ConnectionFailure, match="closed"):
        pool.checkout(1)
    pool.checkin(out)
    assert out.closed and numbers(pool) == (0, 0, 0)
    assert stats.count("closed") == 2


# --- maintain ------------------------------------------------------------------------------

def test_maintain_closes_connections_idle_too_long(make_pool, stats):
    pool = make_pool(max_size=5, idle_timeout=60)
    conns = [pool.checkout(1) for _ in range(3)]
    for conn in conns:
        pool.checkin(conn)
    conns[0].last_checkin -= 120
    conns[1].last_checkin -= 120
    pool.maintain()
    assert conns[0].closed and conns[1].closed and not conns[2].closed
    assert numbers(pool) == (1, 0, 0)
    assert stats.count("closed") == 2
    assert pool.checkout(0) is conns[2]
    pool.checkin(conns[2])


def test_maintain_keeps_min_idle_even_when_expired(make_pool, connector):
    pool = make_pool(max_size=5, min_idle=2, idle_timeout=60)
    conns = [pool.checkout(1) for _ in range(4)]
    for conn in conns:
        pool.checkin(conn)
        conn.last_checkin -= 120
    pool.maintain()
    assert numbers(pool) == (2, 0, 0)
    assert sum(c.closed for c in conns) == 2
    assert connector.calls == 4 and connector.live == 2


def test_maintain_opens_up_to_min_idle(make_pool, connector, stats):
    pool = make_pool(max_size=5, min_idle=2)
    pool.maintain()
    assert numbers(pool) == (2, 0, 0)
    assert connector.calls == 2 and stats.count("created") == 2
    pool.maintain()
    assert connector.calls == 2
    first = pool.checkout(0)
    pool.maintain()  # one idle left: open one more
    assert numbers(pool) == (3, 1, 0) and connector.calls == 3
    pool.checkin(first)


def test_maintain_never_opens_beyond_max_size(make_pool, connector):
    pool = make_pool(max_size=2, min_idle=3)
    held = pool.checkout(1)
    pool.maintain()
    assert numbers(pool) == (2, 1, 0) and connector.calls == 2
    pool.checkin(held)


def test_maintain_connector_failure_frees_every_reserved_slot(make_pool, connector):
    pool = make_pool(max_size=2, min_idle=2)
    connector.fail = ConnectionFailure("refused")
    pool.maintain()
    assert pool.open_count == 0
    pool.maintain()
    connector.fail = None
    conns = [pool.checkout(0.2), pool.checkout(0.2)]
    for conn in conns:
        pool.checkin(conn)


# --- stats and concurrency -----------------------------------------------------------------

def test_stats_hooks_are_called(make_pool, stats):
    pool = make_pool(max_size=1)
    conn = pool.checkout(1)
    assert stats.count("created") == 1 and stats.count("checkout_wait") == 1
    time.sleep(0.05)
    pool.checkin(conn)
    assert stats.count("held") == 1 and stats.calls["held"][0] >= 0.05 - SLACK
    assert pool.checkout(0) is conn
    assert stats.count("created") == 1 and stats.count("checkout_wait") == 2
    with pytest.raises(PoolTimeout):
        pool.checkout(0.01)
    assert stats.count("checkout_timeout") == 1
    pool.checkin(conn, reusable=False)
    assert stats.count("closed") == 1 and stats.count("held") == 2
    assert all(v >= 0 for v in stats.calls["checkout_wait"] + stats.calls["held"])


def test_default_stats_are_no_ops(connector):
    pool = Pool("m", connector, 1)
    conn = pool.checkout(1)
    pool.checkin(conn, reusable=False)
    pool.close()


def test_many_threads_never_exceed_max_size(make_pool, connector):
    pool = make_pool(max_size=3)
    lock = threading.Lock()
    state = {"in_use": 0, "max_in_use": 0, "max_open": 0}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(20):
                conn = pool.checkout(10)
                with lock:
                    state["in_use"] += 1
                    state["max_in_use"] = max(state["max_in_use"], state["in_use"])
                    state["max_open"] = max(state["max_open"], pool.open_count)
                if rng.random() < 0.3:
                    time.sleep(0.0005)
                with lock:
                    state["in_use"] -= 1
                pool.checkin(conn)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert state["max_in_use"] <= 3 and state["max_open"] <= 3
    assert connector.opened <= 3 and connector.live <= 3
    assert numbers(pool) == (connector.live, 0, 0)
