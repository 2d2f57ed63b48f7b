"""Handing whole messages to the fixed pool of workers, a fair share per member.

# design:
# The acceptor submits (client, frame) here once it has taken the client. The workers
# are the threads of fixed ThreadPoolExecutors, each running one loop for its whole
# life over a Crew's queue: a hand-over is a deque append and, if a worker sleeps, the
# release of that worker's own lock (no Future, no Condition). The worker that went to
# sleep last is woken first, so a light load keeps running on the same few threads.
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
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import wire
from dvara_lib.proxy import hello
from dvara_lib.errors import ProtocolError
from dvara_lib.threads import start_thread_pool

if TYPE_CHECKING:
    from dvara_lib.proxy.client import ClientConn, ParkedHello
    from dvara_lib.backend.topology import Member

log = logging.getLogger("dvara.dispatch")

Serve = Callable[["ClientConn", bytes], None]
ServeParked = Callable[["ClientConn", "ParkedHello"], None]

class Crew:
    """A queue of work and a fixed set of threads that take it (see the module notes).

    Methods: put (any thread), stop; parked (a count, read without a lock). ``work`` is
    the queue itself (its length, read without a lock, is how many items wait).
    """

    def __init__(self, count: int, prefix: str, run: Callable[[Any], None]) -> None:
        self.count = count
        self._run = run
        self._lock = threading.Lock()
        self.work: collections.deque[Any] = collections.deque()    # the same deque for life
        self._parked: list[threading.Lock] = []     # last parked last in: woken first
        self.executor = start_thread_pool(count, prefix, self._loop)

    @property
    def parked(self) -> int:
        """Workers asleep, waiting for work."""
        return len(self._parked)

    def put(self, item: Any) -> None:
        """Queue item; wake the worker that went to sleep last, if one sleeps."""
        with self._lock:
            self.work.append(item)
            wake = self._parked.pop() if self._parked else None
        if wake is not None:
            wake.release()

    def stop(self) -> None:
        """Drop the queued work; every worker ends once it is done with its item."""
        with self._lock:
            self.work.clear()
            self.work.extend([None] * self.count)
            parked, self._parked = self._parked, []
        for wake in parked:
            wake.release()

    def _loop(self) -> None:
        """One worker thread, for its whole life."""
        parker = threading.Lock()
        parker.acquire()
        while True:
            with self._lock:
                item = self.work.popleft() if self.work else _PARK
                if item is _PARK:
                    self._parked.append(parker)
            if item is _PARK:
                parker.acquire()            # until put or stop wakes this one
                continue
            if item is None:
                return
            try:
                self._run(item)
            except Exception:
                log.exception("a worker failed")


_PARK = object()


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
        self.queued = self._crew.work     # read by the relay (its backlog), once per message
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
        return bool(self.queued) or self.held > 0

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
