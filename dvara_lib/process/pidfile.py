"""The pidfile: written atomically, and locked so that a second dvara refuses to start.

The lock is an flock on ``<pidfile>.lock``, a file that is never renamed, held for the
life of the process; the pidfile itself is replaced atomically (write, fsync, rename).
On a graceful restart the new process inherits the locked descriptor (``DVARA_LOCK_FD``),
so the lock passes from the old process to the new one without a moment unlocked.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from typing import Optional

from dvara_lib.errors import HaltServer

log = logging.getLogger("dvara.pidfile")

LOCK_FD_ENV = "DVARA_LOCK_FD"


class PidFile:
    """Methods for callers: acquire(), write(pid), release(); ``lock_fd`` for a restart."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self.lock_fd: Optional[int] = None

    def acquire(self, inherited_fd: Optional[int] = None) -> None:
        """Lock, or exit with a clear message if another dvara holds the lock."""
        fd = inherited_fd
        if fd is None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HaltServer(f"another dvara (pid {self.read() or '?'}) is running with "
                             f"pidfile {self.path}; not starting a second one") from None
        os.set_inheritable(fd, False)
        self.lock_fd = fd

    def write(self, pid: int) -> None:
        """Replace the pidfile with pid, atomically."""
        folder = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".dvara-pid-", dir=folder)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{pid}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)

    def read(self) -> Optional[int]:
        try:
            with open(self.path) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Remove the pidfile (if it still names this process) and unlock."""
        if self.lock_fd is None:
            return
        if self.read() == os.getpid():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.lock_fd)
        self.lock_fd = None
