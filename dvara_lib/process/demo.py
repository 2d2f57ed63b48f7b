"""The embedded demo backend: a SecantusDB server run as dvara's child process."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from dvara_lib.errors import DiscoveryError

log = logging.getLogger("dvara.demo")

_BACKEND_START_TIMEOUT = 60.0


def _command(port: int, data_dir: str) -> list[str]:
    exe = shutil.which("secantusd-py")
    if exe is None:
        candidate = Path(sys.executable).with_name("secantusd-py")
        if not candidate.exists():
            raise DiscoveryError("--demo needs SecantusDB: pip install SecantusDB "
                                 "(or pip install -e '.[demo]')")
        exe = str(candidate)
    return [exe, "--host", "127.0.0.1", "--port", str(port), "--storage-path", data_dir,
            "--log-level", "WARNING"]


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class DemoBackend:
    """A SecantusDB child on 127.0.0.1:port with its data under data_dir."""

    def __init__(self, port: int, data_dir: str) -> None:
        self.port = port
        self.data_dir = os.path.abspath(data_dir)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        """Start the child and wait until it accepts. Can raise DiscoveryError."""
        if _accepts(self.port):
            raise DiscoveryError(f"--demo-port {self.port} is already in use")
        os.makedirs(self.data_dir, exist_ok=True)
        log.info("starting the demo backend (SecantusDB) on 127.0.0.1:%d, data in %s",
                 self.port, self.data_dir)
        self.proc = subprocess.Popen(_command(self.port, self.data_dir),
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + _BACKEND_START_TIMEOUT
        while not _accepts(self.port):
            if self.proc.poll() is not None:
                raise DiscoveryError(f"the demo backend exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise DiscoveryError("the demo backend did not start within "
                                     f"{_BACKEND_START_TIMEOUT:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        log.info("the demo backend stopped")
