"""A dvara whose essential thread dies exits non-zero, so that cron or systemd restart it.

The fault is injected by tests/inject.py (dvara started through it, a flag file arms
it): the acceptor's loop, or the discovery thread's loop, raises once, after dvara has
started and served. dvara must then stop (after a bounded drain: --graceful-timeout)
with a non-zero status and say which thread died, instead of running on without a
listener or without a picture of the replica set.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pymongo import MongoClient

from tests.helpers import ROOT, Dvara

INJECT = ROOT / "tests" / "inject.py"
GRACE = 5.0          # --graceful-timeout
EXIT_WITHIN = 30.0


def _listens(pid: int) -> bool:
    """Whether pid still has a listening TCP socket (for the failure message)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return f"pid={pid}," in out


@pytest.mark.parametrize("thread", ["acceptor", "discovery"])
def test_dead_thread_makes_dvara_exit_non_zero(secantus, tmp_path: Path, thread: str):
    """The acceptor (or discovery) loop raises once dvara serves: dvara exits with a
    non-zero status within 30 s and its log names the thread that died."""
    flag = tmp_path / "fail-now"
    proxy = Dvara(tmp_path, secantus.address, "--graceful-timeout", f"{GRACE:g}s",
                  launcher=INJECT, env={"DVARA_INJECT": thread, "DVARA_INJECT_FLAG": str(flag)})
    try:
        armed = f"{thread} fault armed" in proxy.log() and \
            f"of {ROOT / 'dvara_lib'}/" in proxy.log()
        assert armed, f"not armed in this checkout's dvara_lib:\n{proxy.log()[:2000]}"
        with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
            assert client.admin.command("ping")["ok"] == 1.0
        flag.touch()
        try:
            status = proxy.proc.wait(EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            status = None
        log = proxy.log()
        fired = "injected fault" in log
        assert fired, f"the {thread} fault did not fire:\n{log[-2000:]}"
        assert status is not None, (
            f"dvara still runs {EXIT_WITHIN:g}s after its {thread} thread died "
            f"(still listening: {_listens(proxy.pid)}); log tail:\n{log[-2000:]}")
        assert status != 0, f"dvara exited 0 after its {thread} thread died"
        after = log.split("dvara is ready", 1)[1]
        named = [line for line in after.splitlines()
                 if thread in line.lower() and not line.startswith((" ", "inject.py"))
                 and any(w in line.lower() for w in ("fail", "died", "dead", "stopp", "exit",
                                                     "crash", "exception"))]
        assert named, f"the log does not name the {thread} thread:\n{log[-2000:]}"
    finally:
        proxy.stop()
