"""Signals turned into actions: graceful restart into new code (SIGUSR2), reload (SIGHUP).

Signal handlers only enqueue; these run in the main thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Optional, Protocol

from dvara_lib.process import handoff
from dvara_lib.config import parse_args
from dvara_lib.errors import DvaraError
from dvara_lib.process.pidfile import LOCK_FD_ENV

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.process.pidfile import PidFile

log = logging.getLogger("dvara.lifecycle")

#: Settings that SIGHUP applies to a running process; any other change needs a restart.
LIVE_SETTINGS = frozenset({
    "max_connections", "min_idle_connections", "max_client_connections",
    "max_per_client_connections", "message_timeout", "client_idle_timeout",
    "server_idle_timeout", "pool_wait_timeout", "get_last_error_timeout", "graceful_timeout",
    "discovery_interval", "log_level", "ganglia", "metrics_interval", "admin_addr",
    "max_buffered_bytes", "worker_linger"})
_NEW_PROCESS_START_TIMEOUT = 60.0


class Server(Protocol):
    """What a restart and a reload need of the running process (dvara_lib.process.server)."""

    settings: "Settings"
    argv: list[str]
    cwd: str
    pidfile: Optional["PidFile"]

    def listener_fds(self) -> dict[int, list[int]]: ...

    def apply_settings(self, settings: "Settings") -> None: ...

    def stop(self, timeout: float = 5.0, sender: Optional[handoff.Sender] = None) -> None: ...


def replace_process(server: Server) -> bool:
    """Start the current code on disk with our listeners; hand it our clients; True if done.

    If the new process fails to start, this one keeps serving (False).
    """
    if server.settings.demo:
        log.error("graceful restart is not supported in --demo mode; ignoring SIGUSR2")
        return False
    try:
        sender = handoff.Sender()
    except OSError as exc:
        log.error("SIGUSR2: cannot open the hand-off socket (%s); still serving", exc)
        return False
    listeners = server.listener_fds()
    env = {**os.environ, handoff.LISTEN_FDS_ENV: handoff.encode_listen_fds(listeners),
           handoff.HANDOFF_ENV: sender.path}
    fds = [fd for group in listeners.values() for fd in group]
    if server.pidfile is not None and server.pidfile.lock_fd is not None:
        env[LOCK_FD_ENV] = str(server.pidfile.lock_fd)
        fds.append(server.pidfile.lock_fd)
    log.info("SIGUSR2: starting a new dvara with %d listener(s)", len(listeners))
    try:
        proc = subprocess.Popen([sys.executable, *server.argv], cwd=server.cwd, env=env,
                                pass_fds=fds, stdin=subprocess.DEVNULL)
    except OSError as exc:
        log.error("could not start a new dvara (%s); still serving", exc)
        sender.close()
        return False
    if not sender.wait_ready(_NEW_PROCESS_START_TIMEOUT, alive=lambda: proc.poll() is None):
        _abandon(proc)
        sender.close()
        return False
    log.info("new dvara (pid %d) serves; handing over clients", proc.pid)
    server.stop(server.settings.graceful_timeout, sender=sender)
    sender.close()
    return True


def _abandon(proc: subprocess.Popen) -> None:
    status = proc.poll()
    if status is None:
        proc.kill()
        status = proc.wait(10)
    log.error("the new dvara did not start (exit status %s); this one keeps serving", status)


def reload(server: Server) -> None:
    """Re-read the configuration; apply what can change live, log what needs a restart."""
    try:
        new = parse_args(server.argv[1:])
    except SystemExit:
        log.error("SIGHUP: the configuration has an error (see above); nothing changed")
        return
    old = server.settings
    changed = [f.name for f in dataclasses.fields(old)
               if getattr(old, f.name) != getattr(new, f.name)]
    live = {name: getattr(new, name) for name in changed if name in LIVE_SETTINGS}
    for name in changed:
        if name not in LIVE_SETTINGS:
            log.warning("SIGHUP: %s changed; it takes effect on a restart (SIGUSR2)",
                        name.replace("_", "-"))
    if not live:
        log.info("SIGHUP: no live setting changed")
        return
    try:
        server.apply_settings(dataclasses.replace(old, **live))
    except (DvaraError, OSError) as exc:
        log.error("SIGHUP: cannot apply the new settings (%s); still serving with the "
                  "old ones", exc)
        return
    log.info("SIGHUP: applied %s", ", ".join(n.replace("_", "-") for n in sorted(live)))


def notify_systemd(state: str) -> None:
    """sd_notify: tell systemd (Type=notify, NotifyAccess=all) we serve, and our pid."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), path)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


def settings_changed_for_metrics(old: "Settings", new: "Settings") -> bool:
    return (old.ganglia, old.metrics_interval, old.admin_addr) != (
        new.ganglia, new.metrics_interval, new.admin_addr)
