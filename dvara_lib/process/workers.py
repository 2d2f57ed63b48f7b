"""--processes N: the parent's side of the worker processes that serve the clients.

# design:
# The parent keeps discovery, the listeners, signals, the pidfile, the metrics services
# and the restart; each of N worker processes (dvara_lib.process.worker) runs a DataPlane of its
# own; each has its own listening socket on every member's port (SO_REUSEPORT: the
# kernel spreads new connections over them). The WorkerSet stands in the Server's place
# for a local DataPlane: it passes each member (and worker i's listener, by
# SCM_RIGHTS; the parent keeps them all, for a restarted worker), each member state
# discovery finds (the parent's answer and topologyVersion counter, so that every
# process answers hellos alike), settings, adopted clients and drain orders to the
# workers over one control channel each, and adds up what they report (metrics, status).
# One thread here reads every channel: replies to requests, a worker's request for a
# member check, clients handed back during a restart; it also restarts a worker that
# died (its clients are lost, the others' are not), at most once a second per worker.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib.process.channel import Channel, ChannelClosed
from dvara_lib.observe.metrics import Metrics, _MemberState, merge_states
from dvara_lib.backend.topology import Member, Topology

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.proxy.handover import ClientSink

log = logging.getLogger("dvara.workers")

#: The environment variable that tells a child it is worker "index/count/fd".
WORKER_ENV = "DVARA_WORKER"
_WORKER_START_TIMEOUT = 60.0
_REQUEST_TIMEOUT = 5.0
_RESTART_DELAY = 1.0
_POLL = 0.5


class _Worker:
    """One worker process and its channel."""

    def __init__(self, index: int, proc: subprocess.Popen, channel: Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.ready = threading.Event()
        self.started = time.monotonic()
        self.last_states: list[tuple[str, _MemberState]] = []


class WorkerSet:
    """The plane of a dvara with --processes N (see DataPlane for the methods)."""

    def __init__(self, settings: "Settings", topology: Topology, metrics: Metrics,
                 wake: Callable[[Member], None]) -> None:
        self.settings = settings
        self.topology = topology
        self.metrics = metrics
        self.wake = wake
        self.count = settings.processes
        self._workers: dict[int, _Worker] = {}
        self._listeners: dict[str, list[socket.socket]] = {}   # member -> one per worker
        self._retired: dict[str, _MemberState] = {}       # numbers of workers that died
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._sender: Optional["ClientSink"] = None
        self._next = itertools.cycle(range(self.count))
        self._thread = threading.Thread(target=self._run, name="dvara-workers", daemon=True)
        metrics.sources.append(self._collect)
        topology.on_change(self._broadcast_state)

    # -- the plane's methods ---------------------------------------------------------------
    def start(self) -> None:
        """Start every worker; return once all serve. Can raise OSError."""
        for index in range(self.count):
            self._launch(index)
        self._thread.start()
        deadline = time.monotonic() + _WORKER_START_TIMEOUT
        for worker in list(self._workers.values()):
            if not worker.ready.wait(max(0.0, deadline - time.monotonic())):
                raise OSError(f"worker {worker.index} did not start within "
                              f"{_WORKER_START_TIMEOUT:.0f}s")

    def add_member(self, real: str, proxy: str, port: int, listeners: list[socket.socket],
                   max_wire_version: int = 0) -> Member:
        member = Member(real, proxy, port, None, self.metrics.member(real))
        member.max_wire_version = max_wire_version
        self._listeners[real] = listeners
        self.topology.add(member)
        for worker in list(self._workers.values()):
            self._send(worker, self._member_message(member), [listeners[worker.index].fileno()])
        return member

    def remove_member(self, member: Member) -> None:
        self.topology.remove(member)
        self._listeners.pop(member.real, None)
        self._broadcast({"op": "retire", "real": member.real})
        self.metrics.forget(member.real)

    def checked(self, member: Member, was_up: bool) -> None:
        self._broadcast_state(member)

    def apply_settings(self, settings: "Settings") -> None:
        self.settings = settings
        self._broadcast({"op": "settings", "settings": settings})

    def adopt(self, sock: socket.socket, meta: dict[str, Any]) -> bool:
        """A client handed over by the process this one replaces: to the next worker."""
        with sock:
            for _ in range(self.count):
                worker = self._workers.get(next(self._next))
                if worker is not None and worker.ready.is_set():
                    try:
                        worker.channel.send({"op": "adopt", "meta": meta}, [sock.fileno()])
                        return True
                    except ChannelClosed:
                        continue
        return False

    def status(self) -> dict[str, Any]:
        """The workers' status, added up."""
        clients = {"clients": 0, "busy": 0}
        members: dict[str, dict[str, Any]] = {}
        workers = []
        for worker in sorted(self._workers.values(), key=lambda w: w.index):
            reply = worker.channel.request({"op": "status"}, _REQUEST_TIMEOUT)
            workers.append({"index": worker.index, "pid": worker.proc.pid,
                            "clients": reply["clients"]["clients"] if reply else None})
            if reply is None:
                continue
            for key in clients:
                clients[key] += reply["clients"][key]
            for real, numbers in reply["members"].items():
                _add_numbers(members.setdefault(real, {}), numbers)
        return {"clients": clients, "members": members, "workers": workers}

    def dead_thread(self) -> Optional[str]:
        return None if self._thread.is_alive() else self._thread.name

    def stop(self, timeout: float, sender: Optional["ClientSink"] = None) -> None:
        """Have every worker drain (handing its clients to sender through this process,
        if there is one) and exit; kill those that do not within timeout + 5 s."""
        self._stopping, self._sender = True, sender
        self._broadcast({"op": "drain", "timeout": timeout, "handoff": sender is not None})
        deadline = time.monotonic() + timeout + 5.0
        for worker in list(self._workers.values()):
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", worker.index)
                worker.proc.kill()
                worker.proc.wait(5)
        for worker in list(self._workers.values()):
            worker.channel.close()
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.close()

    # -- workers ------------------------------------------------------------------------------
    def _launch(self, index: int) -> None:
        """Start worker index and queue up what it needs to serve (it reads in order)."""
        channel, theirs = Channel.pair()
        env = {**os.environ, WORKER_ENV: f"{index}/{self.count}/{theirs.fileno()}"}
        with theirs:
            proc = subprocess.Popen([sys.executable, "-m", "dvara_lib.process.worker"],
                                    env=env, pass_fds=[theirs.fileno()],
                                    stdin=subprocess.DEVNULL)
        worker = _Worker(index, proc, channel)
        channel.send({"op": "start", "process_id": self.topology.process_id,
                      "set_name": self.topology.set_name, "settings": self.settings})
        for member in self.topology.members():
            channel.send(self._member_message(member),
                         [self._listeners[member.real][index].fileno()])
        with self._lock:
            self._workers[index] = worker
            self._selector.register(channel.sock, selectors.EVENT_READ, worker)
        log.info("started worker %d (pid %d)", index, proc.pid)

    @staticmethod
    def _member_message(member: Member) -> dict[str, Any]:
        return {"op": "member", "real": member.real, "proxy": member.proxy,
                "port": member.proxy_port, "state": member.shared_state()}

    def _broadcast_state(self, member: Member) -> None:
        self._broadcast({"op": "state", "real": member.real, "state": member.shared_state()})

    def _broadcast(self, message: dict[str, Any]) -> None:
        for worker in list(self._workers.values()):
            self._send(worker, message)

    @staticmethod
    def _send(worker: _Worker, message: dict[str, Any], fds: list[int] = ()) -> None:
        try:
            worker.channel.send(message, fds)
        except ChannelClosed:
            pass                          # it died: the reader thread starts it again

    # -- the reader thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not (self._stopping and all(w.proc.poll() is not None
                                          for w in self._workers.values())):
            for key, _ in self._selector.select(_POLL):
                self._read(key.data)
            self._replace_dead()

    def _read(self, worker: _Worker) -> None:
        try:
            message, fds = worker.channel.recv()
        except ChannelClosed:
            with self._lock:
                self._selector.unregister(worker.channel.sock)
            return
        op = message.get("op")
        if op == "reply":
            worker.channel.answered(message)
        elif op == "ready":
            worker.ready.set()
        elif op == "wake":
            member = self.topology.get(message["real"])
            if member is not None:
                self.wake(member)
        elif op == "client":
            self._forward_client(message, fds)
        else:
            log.warning("worker %d sent an unknown message %r", worker.index, op)

    def _forward_client(self, message: dict[str, Any], fds: list[int]) -> None:
        """A worker's client, handed back during a restart: on to the new process."""
        with socket.socket(fileno=fds[0]) as sock:
            if self._sender is not None:
                self._sender.send_client(sock, message["meta"])

    def _replace_dead(self) -> None:
        """Restart workers that died (not while stopping), keeping their numbers."""
        for worker in list(self._workers.values()):
            status = worker.proc.poll()
            if status is None or self._stopping:
                continue
            if time.monotonic() - worker.started < _RESTART_DELAY:
                continue                # at most one restart a second per worker
            log.error("worker %d (pid %d) exited with status %s; starting it again",
                      worker.index, worker.proc.pid, status)
            self._retire_numbers(worker)
            with self._lock:
                try:
                    self._selector.unregister(worker.channel.sock)
                except (KeyError, ValueError):
                    pass
            worker.channel.close()
            self._launch(worker.index)

    # -- metrics ------------------------------------------------------------------------------
    def _collect(self, reset_interval: bool) -> list[tuple[str, _MemberState]]:
        """Every worker's numbers, and those of workers that died, added up."""
        states: dict[str, _MemberState] = dict(self._retired)
        for worker in list(self._workers.values()):
            reply = worker.channel.request({"op": "metrics", "reset": reset_interval},
                                           _REQUEST_TIMEOUT)
            if reply is None:
                continue
            worker.last_states = reply["states"]
            for addr, state in reply["states"]:
                states[addr] = merge_states(states[addr], state) if addr in states else state
        return list(states.items())

    def _retire_numbers(self, worker: _Worker) -> None:
        """Keep a dead worker's totals (its interval is over: baselines = totals)."""
        for addr, state in worker.last_states:
            frozen = state._replace(baselines=list(state.counters),
                                    gauges=[0] * len(state.gauges),
                                    hist=[h._replace(values=[], base_count=h.count,
                                                     base_sum=h.sum) for h in state.hist])
            self._retired[addr] = merge_states(self._retired[addr], frozen) \
                if addr in self._retired else frozen
        worker.last_states = []


def _add_numbers(total: dict[str, Any], numbers: dict[str, Any]) -> None:
    """Add one worker's numbers of a member to total (the per-user pools of
    --auth-passthrough, {user: {open, in_use}}, user by user)."""
    for key, value in numbers.items():
        if isinstance(value, dict):
            _add_numbers(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
