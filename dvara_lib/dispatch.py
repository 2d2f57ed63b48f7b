"""Handing whole messages to the fixed pool of workers, a fair share per member.

# design:
# The acceptor submits (client, frame) here once it has taken the client. The workers
# are the threads of fixed ThreadPoolExecutors, each running one loop for its whole
# life over a Crew's queue (a hand-over is a deque append, no Future). Which worker
# takes a message matters more than anything else in a CPython relay: every time the
# GIL passes between threads it costs context switches. So a message goes to a worker
# that is already awake when there is one, a parked worker is woken last-idle-first,
# and a further one is woken only when no awake worker has finished anything for
# SPARE_AFTER while messages wait (servers answer slowly: more workers are needed).
# With a fast server a few hot threads serve everything; with a slow one the crew
# grows to what the load needs, up to --workers.
#
# A hung member holds every worker relaying to it for up to --message-timeout; so that
# it never holds them all (hellos and other members' clients would wait behind it),
# one member's messages use at most ``share`` workers at a time; its further messages
# are held here, in order, with no worker, and the worker that finishes one of that
# member's messages takes the next held one at once. Hellos are never held. Clients
# holding a pinned server connection need no checkout, so their messages go to a
# small crew of their own: clients waiting for the pool can then never hold up the
# getLastError that gives a connection back. ``waiting()`` (no lock) tells a worker
# whether any message waits, so that it lingers on its client only when nobody else
# needs it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import hello, wire
from dvara_lib.errors import ProtocolError

if TYPE_CHECKING:
    from dvara_lib.client import ClientConn, ParkedHello
    from dvara_lib.topology import Member

log = logging.getLogger("dvara.dispatch")

Serve = Callable[["ClientConn", bytes], None]
ServeParked = Callable[["ClientConn", "ParkedHello"], None]

#: Wake one more worker when messages wait and no awake worker finished one for this
#: long (seconds).
SPARE_AFTER = 0.0005


class Crew:
    """A queue of work and a fixed set of threads that take it (see the module notes).

    Methods: put (any thread), nudge (the acceptor's loop), stop, waiting, threads.
    """

    def __init__(self, count: int, prefix: str, run: Callable[[Any], None]) -> None:
        self.count = count
        self._run = run
        self._lock = threading.Lock()
        self._work: collections.deque[Any] = collections.deque()
        self._parked: list[threading.Lock] = []     # last parked last in: woken first
        self._awake = count
        self._finished = 0                          # items done, ever
        self._seen = (0, 0.0)                       # _finished, and when nudge saw it
        self.executor = start_thread_pool(count, prefix, self._loop)

    @property
    def waiting(self) -> int:
        """Items queued, not yet taken (read without the lock)."""
        return len(self._work)

    @property
    def parked(self) -> int:
        """Workers asleep, waiting for work (read without the lock)."""
        return len(self._parked)

    def put(self, item: Any) -> None:
        """Queue item; wake a parked worker if none is awake."""
        with self._lock:
            if not self._work:      # waiting starts now, not at the last finished item
                self._seen = (self._finished, time.monotonic())
            self._work.append(item)
            wake = self._parked.pop() if self._parked and not self._awake else None
            if wake is not None:
                self._awake += 1
        if wake is not None:
            wake.release()

    def nudge(self, now: float) -> Optional[float]:
        """Wake a spare worker if work waits and nothing was finished for SPARE_AFTER.

        Returns in how many seconds to nudge again (None: nothing waits).
        """
        if not self._work:
            return None
        with self._lock:
            finished, since = self._seen
            if self._finished != finished:
                self._seen = (self._finished, now)
                return SPARE_AFTER
            if now - since < SPARE_AFTER:
                return SPARE_AFTER - (now - since)
            self._seen = (finished, now)
            wake = self._parked.pop() if self._parked else None
            if wake is not None:
                self._awake += 1
        if wake is not None:
            wake.release()
        return SPARE_AFTER

    def stop(self) -> None:
        """Drop the queued work; every worker ends once it is done with its item."""
        with self._lock:
            self._work.clear()
            self._work.extend([None] * self.count)
            parked, self._parked = self._parked, []
            self._awake += len(parked)
        for wake in parked:
            wake.release()

    def _loop(self) -> None:
        """One worker thread, for its whole life."""
        parker = threading.Lock()
        parker.acquire()
        while True:
            with self._lock:
                if self._work:
                    item = self._work.popleft()
                    parked = False
                else:
                    self._parked.append(parker)
                    self._awake -= 1
                    parked = True
            if parked:
                parker.acquire()            # until put, nudge or stop wakes this one
                continue
            if item is None:
                return
            try:
                self._run(item)
            except Exception:
                log.exception("a worker failed")
            finally:
                self.progress()

    def progress(self) -> None:
        """A worker finished a message (a hint for nudge: a lost update is harmless)."""
        self._finished += 1


class Dispatcher:
    """The fixed workers, each member's share of them, and the messages held back."""

    def __init__(self, workers: int, pinned_workers: int, serve: Serve,
                 serve_parked: ServeParked) -> None:
        self.workers = workers
        self.serve = serve
        self.serve_parked = serve_parked
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0        # messages being served now
        self._in_flight: collections.Counter["Member"] = collections.Counter()
        self._held: dict["Member", collections.deque[tuple["ClientConn", bytes]]] = {}
        self.held = 0           # held back for their member's share
        self._crew = Crew(workers, "dvara-worker", self._take)
        self._pinned = Crew(pinned_workers, "dvara-pinned", self._take)
        self.executor, self.pinned_executor = self._crew.executor, self._pinned.executor
        # The loops never end by themselves: end them as the interpreter exits, as
        # concurrent.futures ends its idle workers, or the exit would wait forever.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self._stop_crews)

    @property
    def share(self) -> int:
        """How many workers one member's messages may use at once."""
        return max(1, self.workers - max(1, self.workers // 4))

    def waiting(self) -> bool:
        """Whether a message waits for a worker (read without the lock: a hint)."""
        return self._crew.waiting > 0 or self.held > 0

    def progress(self) -> None:
        """A worker that keeps serving one client finished one of its messages."""
        self._crew.progress()

    def nudge(self) -> Optional[float]:
        """Called by the acceptor's loop; seconds until it should call again, or None."""
        now = time.monotonic()
        times = [t for t in (self._crew.nudge(now), self._pinned.nudge(now)) if t is not None]
        return min(times) if times else None

    # -- the acceptor's side ------------------------------------------------------------
    def submit(self, client: "ClientConn", frame: bytes) -> None:
        """Serve frame (the acceptor has handed client over to the workers)."""
        if client.pinned is not None:
            self._pinned.put((self._serve, client, frame, None))
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
        self._crew.put((self._serve, client, frame, member if counted else None))

    def submit_parked(self, client: "ClientConn", parked: "ParkedHello") -> None:
        self._crew.put((self._serve_parked, client, parked, None))

    # -- the workers' side --------------------------------------------------------------
    def _take(self, item: tuple[Callable[..., None], "ClientConn", Any,
                                Optional["Member"]]) -> None:
        run, client, what, member = item
        with self._lock:
            self._active += 1
        try:
            run(client, what, member)
        finally:
            self._done(member)

    def _serve(self, client: "ClientConn", frame: bytes, member: Optional["Member"]) -> None:
        self.serve(client, frame)
        while member is not None:
            next_one = self._next_held(member)
            if next_one is None:
                return
            self.serve(*next_one)

    def _serve_parked(self, client: "ClientConn", parked: "ParkedHello", member: None) -> None:
        self.serve_parked(client, parked)

    def _next_held(self, member: "Member") -> Optional[tuple["ClientConn", bytes]]:
        """A message of member is done: its next held one (the worker keeps the share)."""
        if not self.held:
            return None
        with self._lock:
            held = self._held.get(member)
            while held:
                self.held -= 1
                client, frame = held.popleft()
                if not client.closed:
                    return client, frame
            self._held.pop(member, None)
        return None

    def _done(self, member: Optional["Member"]) -> None:
        """The worker is free: its member's share is given back."""
        with self._lock:
            self._active -= 1
            if member is not None:
                self._in_flight[member] -= 1
                if not self._in_flight[member]:
                    del self._in_flight[member]
            if not self._active:
                self._idle.notify_all()

    def shutdown(self, wait_seconds: float) -> bool:
        """Stop taking work (queued messages are dropped); wait up to wait_seconds for the
        messages being served. False if some were still running."""
        self._stop_crews()
        with self._idle:
            done = self._idle.wait_for(lambda: not self._active, wait_seconds)
        if not done:
            log.warning("%d worker(s) still busy after %.1fs", self._active, wait_seconds)
        self.executor.shutdown(wait=False)
        self.pinned_executor.shutdown(wait=False)
        return done

    def _stop_crews(self) -> None:
        self._crew.stop()
        self._pinned.stop()


def _answered_by_proxy(frame: bytes) -> bool:
    """A hello or isMaster: the relay answers it itself, without the member."""
    try:
        return wire.opcode(frame) != wire.OP_COMPRESSED and hello.is_hello(
            wire.command_name(frame))
    except ProtocolError:
        return False


def start_thread_pool(count: int, prefix: str, loop: Optional[Callable[[], None]] = None
                      ) -> concurrent.futures.ThreadPoolExecutor:
    """A ThreadPoolExecutor with all its threads started now, so the count stays fixed;
    with loop, each thread then runs loop() for its whole life."""
    executor = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix=prefix)
    barrier = threading.Barrier(count + 1)

    def started() -> None:
        barrier.wait(10)
        if loop is not None:
            loop()

    for _ in range(count):
        executor.submit(started)
    barrier.wait(10)
    return executor
