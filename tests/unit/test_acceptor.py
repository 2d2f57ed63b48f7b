"""The acceptor in-process: a real Acceptor thread and listener, a fake dispatcher that
records what it is handed, the test playing the workers."""

from __future__ import annotations

import logging
import queue
import socket
import time
from typing import Any, Iterator

import pytest

from dvara_lib import wire
from dvara_lib.proxy.acceptor import Acceptor
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO, ParkedHello, Verdict
from dvara_lib.config import parse_args
from dvara_lib.observe.metrics import Metrics
from dvara_lib.backend.pool import Pool
from dvara_lib.backend.topology import Member, Topology
from tests.helpers import wait_until

REAL = "db1.example:27017"


class FakeDispatcher:
    """Records each hand-over; the test serves it and hands the client back."""

    def __init__(self) -> None:
        self.handed: queue.SimpleQueue[tuple[str, ClientConn, Any]] = queue.SimpleQueue()

    def submit(self, client: ClientConn, frame: bytes) -> None:
        assert client.busy, "handed over without being taken"
        self.handed.put(("frame", client, frame))

    def submit_parked(self, client: ClientConn, parked: ParkedHello) -> None:
        assert client.busy, "handed over without being taken"
        self.handed.put(("parked", client, parked))

    def next(self, timeout: float = 5.0) -> tuple[str, ClientConn, Any]:
        return self.handed.get(timeout=timeout)

    def nothing_more(self, wait: float = 0.3) -> bool:
        try:
            got = self.handed.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"handed over once more: {got[0]} {got[1]}")


class FakeRelay:
    gate = None

    def release_pin(self, client: ClientConn, reusable: bool) -> None:
        raise AssertionError("no pins in these tests")


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Stack:
    def __init__(self, budget: int) -> None:
        self.settings = parse_args(["--addrs", REAL, "--message-timeout", "5s"], env={})
        self.topology = Topology("rs0")
        pool = Pool(REAL, lambda: (_ for _ in ()).throw(AssertionError("no server")), 1)
        self.member = Member(REAL, "127.0.0.1:1", 1, pool, Metrics().member(REAL))
        self.topology.add(self.member)
        self.dispatcher = FakeDispatcher()
        self.io = ClientIO(Budget(budget), 5.0)
        self.acceptor = Acceptor(self.settings, self.dispatcher, FakeRelay(), self.io)
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.acceptor.add_listener(listener, self.member)
        self.errors = Errors()
        logging.getLogger("dvara").addHandler(self.errors)
        self.acceptor.start()
        self.peers: list[socket.socket] = []

    def connect(self) -> socket.socket:
        peer = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        logging.getLogger("dvara").removeHandler(self.errors)
        for peer in self.peers:
            peer.close()
        self.acceptor.stop()
        self.acceptor.join(5)
        self.member.pool.close()


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(getattr(request, "param", 1 << 30))   # the buffer budget
    yield s
    s.close()
    assert not s.errors.records, [r.getMessage() for r in s.errors.records]


def awaitable_hello(topology: Topology, member: Member) -> bytes:
    tv = {"processId": topology.process_id, "counter": member.counter}
    return wire.op_msg({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 10000,
                        "$db": "admin"})


def park(frame: bytes, counter: int, wait: float = 10.0) -> ParkedHello:
    return ParkedHello(frame, "hello", time.monotonic() + wait, False, counter)


def test_a_parked_hello_is_handed_out_once_whatever_the_order(stack: Stack):
    """The interleaving that once gave one client to two workers: a worker parks a hello
    and, before its hand-back reaches the acceptor, the member changes. The acceptor
    must hand the client out again exactly once, after the hand-back."""
    peer = stack.connect()
    frame = awaitable_hello(stack.topology, stack.member)
    peer.sendall(frame)
    kind, client, got = stack.dispatcher.next()
    assert (kind, got) == ("frame", frame)
    parked = park(frame, stack.member.counter)
    stack.member.counter += 1                     # a step-down is seen meanwhile ...
    stack.acceptor.topology_changed(stack.member)  # ... and processed first
    assert stack.dispatcher.nothing_more()         # the worker still owns the client
    assert client.parked is None and client.busy
    stack.acceptor.handback(client, Verdict.PARK, parked)
    stack.acceptor.topology_changed(stack.member)
    kind, again, answered = stack.dispatcher.next()
    assert (kind, again, answered) == ("parked", client, parked)
    assert stack.dispatcher.nothing_more()
    stack.acceptor.handback(client, Verdict.RESUME)
    peer.sendall(wire.op_msg({"ping": 1, "$db": "admin"}))
    assert stack.dispatcher.next()[0] == "frame"   # still registered once, still served


def test_a_parked_hello_is_answered_at_its_deadline(stack: Stack):
    peer = stack.connect()
    peer.sendall(awaitable_hello(stack.topology, stack.member))
    _, client, frame = stack.dispatcher.next()
    stack.acceptor.handback(client, Verdict.PARK, park(frame, stack.member.counter, 0.2))
    started = time.monotonic()
    kind, again, _ = stack.dispatcher.next()
    assert (kind, again) == ("parked", client)
    assert 0.1 <= time.monotonic() - started < 3


def test_what_comes_while_a_worker_owns_the_client_is_left_to_the_worker(stack: Stack):
    peer = stack.connect()
    first, second, third = (wire.op_msg({"ping": i, "$db": "admin"}) for i in (1, 2, 3))
    peer.sendall(first)
    _, client, _ = stack.dispatcher.next()
    peer.sendall(second)                           # wakes nobody: the worker reads it
    assert stack.dispatcher.nothing_more(0.2) and client.buf == b"" and not client.pending
    wait_until(lambda: client.fill() and client.has_frame(), "the worker to read it")
    assert client.next_frame() == second
    peer.sendall(third)                            # comes as the worker lets go:
    if client.release():                           # the acceptor reads it ...
        assert stack.dispatcher.next()[1:] == (client, third)
        assert client.release()
    else:                                          # ... or the worker is told to
        wait_until(lambda: client.fill() and client.has_frame(), "the worker to read it")
        assert client.next_frame() == third
        assert client.release()
    assert stack.dispatcher.nothing_more(0.2)
    peer.sendall(first)
    assert stack.dispatcher.next()[2] == first     # and the client is watched again


def test_a_closed_client_is_closed_once_its_worker_hands_it_back(stack: Stack):
    peer = stack.connect()
    peer.sendall(wire.op_msg({"ping": 1, "$db": "admin"}))
    _, client, _ = stack.dispatcher.next()
    stack.acceptor.call_soon(lambda: stack.acceptor._close(client, "test"))
    wait_until(lambda: client.closing, "the close to be deferred to the worker")
    assert not client.closed
    stack.acceptor.handback(client, Verdict.RESUME)
    wait_until(lambda: client.closed, "the acceptor to close it")
    assert stack.acceptor.counts() == {"clients": 0, "busy": 0}


def test_a_client_that_closes_after_sending_is_served_first(stack: Stack):
    peer = stack.connect()
    frame = wire.op_msg({"insert": "c", "documents": [{}], "$db": "d"}, flags=wire.MORE_TO_COME)
    peer.sendall(frame)
    peer.close()
    kind, client, got = stack.dispatcher.next()
    assert (kind, got) == ("frame", frame)
    stack.acceptor.handback(client, Verdict.RESUME)
    wait_until(lambda: client.closed, "the client to be closed after its message")


def _insert_of(size: int) -> bytes:
    return wire.op_msg({"insert": "c", "documents": [{"pad": "x" * size}], "$db": "d"})


@pytest.mark.parametrize("stack", [256 * 1024], indirect=True)
def test_over_the_budget_clients_mid_message_wait_and_small_messages_flow(stack: Stack):
    big = [_insert_of(400 * 1024) for _ in range(4)]
    peers = [stack.connect() for _ in big]
    for peer, frame in zip(peers, big):
        peer.setblocking(False)
        try:
            peer.send(frame[:300 * 1024])            # part of a message, then a stall
        except BlockingIOError:
            pass
    wait_until(lambda: stack.io.budget.used >= 256 * 1024, "the budget to be spent")
    time.sleep(0.2)                                # the acceptor reads no further ...
    assert stack.io.budget.used <= 256 * 1024 + 420 * 1024, stack.io.budget.used
    small = stack.connect()
    ping = wire.op_msg({"ping": 1, "$db": "admin"})
    small.sendall(ping)
    kind, client, frame = stack.dispatcher.next()  # ... but a small message goes through
    assert frame == ping
    client.release()
    for peer, frame in zip(peers, big):            # the rest comes: every message is whole
        peer.setblocking(True)
        peer.sendall(frame[300 * 1024:])
    whole = []
    for _ in big:
        kind, client, frame = stack.dispatcher.next(10)
        whole.append(frame)
        client.release()
    assert sorted(whole) == sorted(big)
    wait_until(lambda: stack.io.budget.used == 0, "every buffered byte to be let go")


def test_descriptors_are_closed_only_after_the_acceptor_stops(stack: Stack):
    """A hand-back that comes after the acceptor stopped is a no-op, not a write to a
    closed (maybe reused) descriptor."""
    peer = stack.connect()
    peer.sendall(wire.op_msg({"ping": 1, "$db": "admin"}))
    _, client, _ = stack.dispatcher.next()
    stack.acceptor.stop()
    stack.acceptor.join(5)
    assert not stack.acceptor.is_alive()
    reused = socket.socket()                       # likely takes the freed descriptor
    try:
        stack.acceptor.handback(client, Verdict.RESUME)
        assert reused.fileno() >= 0
    finally:
        reused.close()
        client.close()
