"""The dispatcher's member shares, and discovery's limit on rechecks."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import pytest

from dvara_lib import wire
from dvara_lib.backend import discovery
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO
from dvara_lib.proxy.dispatch import Dispatcher
from dvara_lib.observe.metrics import Metrics
from dvara_lib.backend.pool import Pool
from dvara_lib.backend.topology import Member, Topology
from tests.helpers import wait_until


def _member(real: str, metrics: Metrics) -> Member:
    pool = Pool(real, lambda: socket.socket(), 1)
    return Member(real, "127.0.0.1:1", 1, pool, metrics.member(real))


def test_one_member_uses_at_most_its_share_and_held_messages_run_in_order():
    metrics = Metrics()
    slow, other = _member("slow:1", metrics), _member("other:1", metrics)
    release = threading.Event()
    running: list[bytes] = []
    lock = threading.Lock()

    def serve(client: ClientConn, frame: bytes) -> None:
        with lock:
            running.append(frame)
        if client.member is slow and wire.command_name(frame) == "find":
            release.wait(10)                    # a hung member

    dispatcher = Dispatcher(4, 2, serve, lambda c, p: None)   # share: 3 of 4 workers
    socks = []
    try:
        def client_of(member: Member) -> ClientConn:
            a, b = socket.socketpair()
            socks.extend((a, b))
            client = ClientConn(a, ("127.0.0.1", 1), member, ClientIO(Budget(1 << 20), 1.0))
            client.take()
            return client

        frames = [wire.op_msg({"find": "c", "n": i, "$db": "d"}) for i in range(5)]
        for frame in frames:
            dispatcher.submit(client_of(slow), frame)
        def running_now(n: int) -> bool:
            return len(running) == n

        wait_until(lambda: running_now(3), "three of the slow member's messages to run")
        assert dispatcher.held == 2 and dispatcher.waiting()
        hello = wire.op_msg({"hello": 1, "$db": "admin"})
        dispatcher.submit(client_of(slow), hello)          # a hello is never held
        ping = wire.op_msg({"ping": 1, "$db": "admin"})
        dispatcher.submit(client_of(other), ping)          # nor another member's message
        wait_until(lambda: running_now(5) and hello in running and ping in running,
                   "hello and ping to run")
        release.set()
        wait_until(lambda: running_now(7), "the held messages to run")
        assert sorted(running[-2:]) == sorted(frames[3:])
        wait_until(lambda: not dispatcher.waiting(), "nothing left waiting")
    finally:
        release.set()
        assert dispatcher.shutdown(5)
        for s in socks:
            s.close()


class CountingMonitor:
    def __init__(self, member: Member) -> None:
        self.member = member
        self.checks: list[float] = []

    def check(self) -> discovery.Check:
        self.checks.append(time.monotonic())
        return discovery.Check(self.member, {"ok": 1, "isWritablePrimary": True}, [])

    def close(self) -> None:
        pass


@pytest.fixture()
def checked_member(monkeypatch: Any) -> Iterator[tuple[Member, CountingMonitor, Any]]:
    """A running discovery thread whose one member is checked by a CountingMonitor,
    after its first check."""
    topology = Topology("rs0")
    member = _member("db1:27017", Metrics())
    topology.add(member)
    monitor = CountingMonitor(member)
    thread = discovery.DiscoveryThread(topology, interval=60.0, timeout=1.0)
    monkeypatch.setattr(thread, "_monitor", lambda m: monitor)
    thread.start()
    try:
        wait_until(lambda: monitor.checks, "the first check")
        yield member, monitor, thread
    finally:
        thread.close()
        thread.join(5)
        member.pool.close()


def test_a_storm_of_wake_ups_rechecks_a_member_at_most_every_quarter_second(checked_member):
    member, monitor, thread = checked_member
    started = time.monotonic()
    while time.monotonic() - started < 1.5:           # every failed request wakes it
        thread.wake(member)
        thread.wake()
        time.sleep(0.001)
    wait_until(lambda: time.monotonic() - monitor.checks[-1] > discovery.MIN_RECHECK,
               "the storm to settle")
    gaps = [b - a for a, b in zip(monitor.checks, monitor.checks[1:])]
    assert 4 <= len(monitor.checks) <= 1.5 / discovery.MIN_RECHECK + 2, monitor.checks
    assert min(gaps) >= discovery.MIN_RECHECK * 0.95, gaps


def test_a_wake_up_brings_the_next_check_forward(checked_member):
    member, monitor, thread = checked_member
    wait_until(lambda: time.monotonic() - monitor.checks[-1] > discovery.MIN_RECHECK,
               "the first check to be a recheck gap old")
    woken = time.monotonic()
    thread.wake(member)
    wait_until(lambda: len(monitor.checks) == 2, "a check soon after the wake-up", 2)
    assert monitor.checks[1] - woken < 0.2


def test_a_crew_wakes_the_worker_that_slept_last():
    from dvara_lib.proxy.dispatch import Crew
    used: list[str] = []
    done = threading.Semaphore(0)

    def run(item: int) -> None:
        used.append(threading.current_thread().name)
        done.release()

    crew = Crew(8, "test-crew", run)
    try:
        wait_until(lambda: crew.parked == 8, "the crew to wait for work")
        for i in range(200):                  # one at a time: a light load
            crew.put(i)
            assert done.acquire(timeout=5)
            wait_until(lambda: crew.parked == 8, "the worker to sleep again")
        assert len(set(used)) == 1, set(used)    # the same hot thread every time
        for i in range(8):                    # eight at once: each takes one
            crew.put(i)
        for _ in range(8):
            assert done.acquire(timeout=5)
    finally:
        crew.stop()
        crew.executor.shutdown(wait=True)
