"""A worker process of a dvara with --processes N: one DataPlane, fed by the parent.

    python -m dvara_lib.process.worker <dvara's arguments>   (started by dvara_lib.process.workers)

# design:
# The worker takes its parent's settings from its first message, then reads its control channel in
# its main thread: the members to serve (with their listening sockets), each member
# state the parent's discovery found, new settings, clients to adopt, requests for its
# metrics and status, and the order to drain. It asks the parent to check a member when
# one of its server connections fails. Signals are the parent's to handle: a worker
# drains when told to, or when the parent goes away (the channel closes).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Any, Optional

from dvara_lib import __version__
from dvara_lib.backend.connect import Backend
from dvara_lib.process.app import setup_logging
from dvara_lib.process.channel import Channel, ChannelClosed
from dvara_lib.proxy.dataplane import DataPlane, Share, pin_to_cpu
from dvara_lib.observe.metrics import Metrics, thin
from dvara_lib.backend.topology import Member, Topology
from dvara_lib.process.workers import WORKER_ENV

log = logging.getLogger("dvara.worker")

#: Most observations per histogram sent to the parent in one metrics reply.
_SENT_OBSERVATIONS = 4096
#: Exit status when the data plane's own thread died (the parent starts a new worker).
_EXIT_THREAD_DIED = 70
_ORPHAN_DRAIN = 5.0
_WATCH_INTERVAL = 1.0


class Handback:
    """The sender a draining worker hands its clients to: its parent, which forwards
    them to the process that replaces this dvara."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def send_client(self, sock: socket.socket, meta: bytes) -> bool:
        try:
            self.channel.send({"op": "client", "meta": meta}, [sock.fileno()])
            return True
        except ChannelClosed:
            return False


class Worker:
    """The worker's main loop: one message from the parent at a time."""

    def __init__(self, channel: Channel, share: Share) -> None:
        self.channel = channel
        self.share = share
        self.plane: Optional[DataPlane] = None
        self.topology: Optional[Topology] = None
        self.metrics = Metrics()

    def run(self) -> int:
        while True:
            if self.plane.dead_thread():
                log.critical("the acceptor died (see above); this worker exits")
                return _EXIT_THREAD_DIED
            try:
                got = self.channel.recv(timeout=_WATCH_INTERVAL)
            except ChannelClosed:
                return self._orphaned()
            if got is not None and self._handle(*got):
                return 0

    def _handle(self, message: dict[str, Any], fds: list[int]) -> bool:
        """Act on one message from the parent; True once drained and done."""
        op = message["op"]
        if op == "member":
            self._add_member(message, fds[0])
        elif op == "state":
            self._state(message["real"], message["state"])
        elif op == "retire":
            member = self.topology.get(message["real"])
            if member is not None:
                self.plane.remove_member(member)
        elif op == "settings":
            self.plane.apply_settings(message["settings"])
        elif op == "adopt":
            self.plane.adopt(socket.socket(fileno=fds[0]), message["meta"])
        elif op == "metrics":
            states = self.metrics.take(message["reset"])
            self.channel.reply(message, states=[(a, thin(s, _SENT_OBSERVATIONS))
                                                for a, s in states])
        elif op == "status":
            self.channel.reply(message, **self.plane.status())
        elif op == "drain":
            self.plane.stop(message["timeout"],
                            Handback(self.channel) if message["handoff"] else None)
            return True
        return False

    def start(self, message: dict[str, Any]) -> None:
        """Build the data plane from the parent's first message, then say so."""
        settings = message["settings"]
        self.topology = Topology(message["set_name"], message["process_id"])
        backend = Backend.from_settings(settings, __version__)
        self.plane = DataPlane(settings, self.topology, self.metrics, self._wake, backend,
                               self.share)
        self.plane.start()
        self.channel.send({"op": "ready"})

    def _add_member(self, message: dict[str, Any], fd: int) -> None:
        state = message["state"]
        member = self.plane.add_member(message["real"], message["proxy"], message["port"],
                                       [socket.socket(fileno=fd)], state["max_wire_version"])
        self.topology.apply_state(member, state)

    def _state(self, real: str, state: dict[str, Any]) -> None:
        member = self.topology.get(real)
        if member is not None:
            was_up = member.up
            self.topology.apply_state(member, state)
            DataPlane.checked(member, was_up)

    def _wake(self, member: Member) -> None:
        try:
            self.channel.send({"op": "wake", "real": member.real})
        except ChannelClosed:
            pass

    def _orphaned(self) -> int:
        """The parent is gone: close clients between messages and exit."""
        log.error("the dvara parent process went away; this worker stops")
        if self.plane is not None:
            self.plane.stop(_ORPHAN_DRAIN)
        return 1


def main() -> int:
    index, count, fd = (int(x) for x in os.environ.pop(WORKER_ENV).split("/"))
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)      # the parent decides; it tells us
    channel = Channel(socket.socket(fileno=fd))
    try:
        start, _ = channel.recv()
    except ChannelClosed:
        return 1
    setup_logging(start["settings"], f"[w{index}]")
    cpu = pin_to_cpu(start["settings"].cpu_affinity, index)
    if cpu is not None:
        log.info("worker %d serving on CPU %d (--cpu-affinity)", index, cpu)
    worker = Worker(channel, Share(index, count))
    worker.start(start)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
