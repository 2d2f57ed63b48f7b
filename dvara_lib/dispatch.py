"""Handing whole messages to the fixed pool of workers, a fair share per member.

# design:
# The acceptor submits (client, frame) here once it has taken the client. A hung member
# holds every worker relaying to it for up to --message-timeout; so that it never holds
# them all (hellos and other members' clients would wait behind it), one member's
# messages use at most ``share`` workers at a time; its further messages are held here,
# in order, with no worker, and the worker that finishes one of that member's messages
# takes the next held one at once. Hellos (the proxy answers them) are never held.
# Clients holding a pinned server connection need no checkout, so their messages go to
# a few workers of their own: clients waiting for the pool can then never hold up the
# getLastError that gives a connection back. ``waiting()`` (no lock) tells a worker
# whether any message waits for a worker, so that it lingers on its client only when
# nobody else needs it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Callable, Optional

from dvara_lib import hello, wire
from dvara_lib.errors import ProtocolError

if TYPE_CHECKING:
    from dvara_lib.client import ClientConn, ParkedHello
    from dvara_lib.topology import Member

log = logging.getLogger("dvara.dispatch")

Serve = Callable[["ClientConn", bytes], None]
ServeParked = Callable[["ClientConn", "ParkedHello"], None]


class Dispatcher:
    """The fixed executors, each member's share of them, and the messages held back."""

    def __init__(self, workers: int, pinned_workers: int, serve: Serve,
                 serve_parked: ServeParked) -> None:
        self.workers = workers
        self.serve = serve
        self.serve_parked = serve_parked
        self.executor = start_thread_pool(workers, "dvara-worker")
        self.pinned_executor = start_thread_pool(pinned_workers, "dvara-pinned")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0        # messages being served now
        self._in_flight: collections.Counter["Member"] = collections.Counter()
        self._held: dict["Member", collections.deque[tuple["ClientConn", bytes]]] = {}
        self.queued = 0         # submitted, not yet started
        self.held = 0           # held back for their member's share

    @property
    def share(self) -> int:
        """How many workers one member's messages may use at once."""
        return max(1, self.workers - max(1, self.workers // 4))

    def waiting(self) -> bool:
        """Whether a message waits for a worker (read without the lock: a hint)."""
        return self.queued > 0 or self.held > 0

    # -- the acceptor's side ------------------------------------------------------------
    def submit(self, client: "ClientConn", frame: bytes) -> None:
        """Serve frame (the acceptor has handed client over to the workers)."""
        if client.pinned is not None:
            self.pinned_executor.submit(self._run, client, frame, None, False)
            return
        member = client.member
        with self._lock:
            counted = self._in_flight[member] < self.share
            if counted:
                self._in_flight[member] += 1
            elif not _answered_by_proxy(frame):
                self._held.setdefault(member, collections.deque()).append((client, frame))
                self.held += 1
                return
            self.queued += 1
        self.executor.submit(self._run, client, frame, member if counted else None, True)

    def submit_parked(self, client: "ClientConn", parked: "ParkedHello") -> None:
        self.executor.submit(self._run_parked, client, parked)

    # -- the workers' side --------------------------------------------------------------
    def _run(self, client: "ClientConn", frame: bytes, member: Optional["Member"],
             queued: bool) -> None:
        with self._lock:
            self.queued -= queued
            self._active += 1
        try:
            next_one: Optional[tuple["ClientConn", bytes]] = (client, frame)
            while next_one is not None:
                self.serve(*next_one)
                next_one = self._finished(member) if member is not None else None
        finally:
            self._done()

    def _run_parked(self, client: "ClientConn", parked: "ParkedHello") -> None:
        with self._lock:
            self._active += 1
        try:
            self.serve_parked(client, parked)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._active -= 1
            if not self._active:
                self._idle.notify_all()

    def _finished(self, member: "Member") -> Optional[tuple["ClientConn", bytes]]:
        """A message of member is done: its next held one (the worker keeps the share),
        or None (the share is given back)."""
        with self._lock:
            held = self._held.get(member)
            while held:
                self.held -= 1
                client, frame = held.popleft()
                if not client.closed:
                    return client, frame
            self._held.pop(member, None)
            self._in_flight[member] -= 1
            if not self._in_flight[member]:
                del self._in_flight[member]
        return None

    def shutdown(self, wait_seconds: float) -> bool:
        """Stop taking work (queued messages are dropped); wait up to wait_seconds for the
        messages being served. False if some were still running."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.pinned_executor.shutdown(wait=False, cancel_futures=True)
        with self._idle:
            done = self._idle.wait_for(lambda: not self._active, wait_seconds)
        if not done:
            log.warning("%d worker(s) still busy after %.1fs", self._active, wait_seconds)
        return done


def _answered_by_proxy(frame: bytes) -> bool:
    """A hello or isMaster: the relay answers it itself, without the member."""
    try:
        return wire.opcode(frame) != wire.OP_COMPRESSED and hello.is_hello(
            wire.command_name(frame))
    except ProtocolError:
        return False


def start_thread_pool(count: int, prefix: str) -> concurrent.futures.ThreadPoolExecutor:
    """A ThreadPoolExecutor with all its threads started now, so the count stays fixed."""
    executor = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix=prefix)
    barrier = threading.Barrier(count + 1)
    for _ in range(count):
        executor.submit(barrier.wait, 10)
    barrier.wait(10)
    return executor
