"""Signals never stop a serving dvara by accident.

- SIGHUP whose new settings cannot be applied (the admin endpoint cannot bind) keeps
  dvara serving on the old settings and logs that the reload failed.
- SIGHUP that changes get-last-error-timeout really applies it to legacy pins.
- SIGUSR2 whose hand-off socket cannot be created keeps the old process serving.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from pymongo import MongoClient

from tests.helpers import Dvara, free_port, metric_sum, wait_until
from tests.legacy_peers import LegacyClient, Mongod24

RELOAD_WAIT = 15.0


def _healthz(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/healthz", timeout=5) as reply:
        return reply.read().decode().strip()


def _ping(proxy: Dvara) -> float:
    with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
        return client.admin.command("ping")["ok"]


@contextlib.contextmanager
def _running(proxy: Dvara) -> Iterator[Dvara]:
    """proxy, stopped on the way out."""
    try:
        yield proxy
    finally:
        proxy.stop()


def _settle(predicate: Callable[[], Any], seconds: float) -> bool:
    """wait_until without the failure: poll up to `seconds`; the predicate's last value."""
    try:
        return bool(wait_until(predicate, "settling", seconds))
    except AssertionError:
        return False


def _exited_or_logged(proxy: Dvara, pattern: str) -> bool:
    return proxy.proc.poll() is not None or re.search(pattern, proxy.log()) is not None


# -- SIGHUP --------------------------------------------------------------------------------

#: A line at ERROR or WARNING that says a SIGHUP reload did not work.
RELOAD_FAILED = r"(?im)^\S+ \S+ (ERROR|WARNING) .*(SIGHUP|reload).*(fail|error|cannot|could not)"


def test_sighup_with_an_admin_addr_in_use_keeps_serving(secantus, tmp_path: Path):
    """The config's admin-addr moves to a port another socket holds; SIGHUP: dvara keeps
    running and serving, the old admin endpoint still answers, and the log says the
    reload failed (today the bind error escapes the main loop and dvara exits)."""
    old_admin = f"127.0.0.1:{free_port()}"
    conf = tmp_path / "dvara.conf"
    conf.write_text(f"admin-addr = {old_admin}\n")
    with socket.create_server(("127.0.0.1", 0)) as taken, \
            _running(Dvara(tmp_path, secantus.address, "-c", str(conf))) as proxy:
        pid = proxy.pid
        assert _ping(proxy) == 1.0 and _healthz(old_admin) == "ok"
        conf.write_text(f"admin-addr = 127.0.0.1:{taken.getsockname()[1]}\n")
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: _exited_or_logged(proxy, RELOAD_FAILED),
                   "dvara to log the failed reload", RELOAD_WAIT)
        assert proxy.proc.poll() is None, \
            f"dvara exited ({proxy.proc.returncode}) on SIGHUP:\n{proxy.log()[-2000:]}"
        assert proxy.pid == pid and _ping(proxy) == 1.0
        assert _healthz(old_admin) == "ok", "the old admin endpoint stopped answering"


def _write(client: LegacyClient, tag: str, n: int) -> None:
    client.insert([{"tag": tag, "k": k} for k in range(n)])


def test_sighup_applies_get_last_error_timeout(tmp_path: Path):
    """get-last-error-timeout goes from 1m to 1s by SIGHUP: a legacy write's pin is then
    released after about 1 s, and a later getLastError is answered as after a timed-out
    pin (n: 0 from the proxy, nothing sent to the server). Today the relay keeps 1m
    although the log says the setting was applied."""
    admin = f"127.0.0.1:{free_port()}"
    conf = tmp_path / "dvara.conf"
    conf.write_text(f"get-last-error-timeout = 1m\nmax-connections = 1\nadmin-addr = {admin}\n")
    with contextlib.ExitStack() as stack:
        mongod = Mongod24()
        stack.callback(mongod.stop)
        proxy = stack.enter_context(_running(Dvara(tmp_path, mongod.address, "-c", str(conf))))
        client = stack.enter_context(contextlib.closing(LegacyClient(proxy.port, timeout=30)))
        conf.write_text(f"get-last-error-timeout = 1s\nmax-connections = 1\n"
                        f"admin-addr = {admin}\n")
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: applied get-last-error-timeout" in proxy.log(),
                   "the reload", RELOAD_WAIT)
        my_id = client.command({"isMaster": 1}, db="admin")["connectionId"]
        timeouts = metric_sum(admin, "gle.pin_timeouts")
        tag = "after-reload"
        _write(client, tag, 4)
        wait_until(lambda: mongod.find(kind="insert", tag=tag), "the write to arrive")
        # Past the new 1 s (pins are checked every 0.5 s); today the pin holds for 1m.
        _settle(lambda: metric_sum(admin, "gle.pin_timeouts") > timeouts, 6)
        answer = client.command({"getlasterror": 1, "tag": tag})
        assert answer == {"n": 0, "connectionId": my_id, "err": None, "ok": 1.0}, (
            f"getLastError 6s after a write with get-last-error-timeout reloaded to 1s was "
            f"answered from the still-pinned connection: {answer}")
        assert mongod.find(kind="command", tag=tag) == []
        assert metric_sum(admin, "gle.pin_timeouts") == timeouts + 1
        assert metric_sum(admin, "gle.pinned") == 0


# -- SIGUSR2 -------------------------------------------------------------------------------

#: A line at ERROR that says the restart (hand-off) did not happen.
RESTART_FAILED = r"(?im)^\S+ \S+ ERROR .*(SIGUSR2|restart|hand|new dvara|new process)"


def test_sigusr2_whose_handoff_socket_fails_keeps_serving(secantus, tmp_path: Path):
    """The hand-off's unix socket cannot be created (TMPDIR is so long that its path
    exceeds the 107-byte limit of a unix socket name, which fails for root too): on
    SIGUSR2 dvara logs an error and keeps serving in the same process (today the
    OSError escapes the main loop and dvara exits)."""
    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.bind(str(long_tmp / "dvara-handoff-xxxxxxxx" / "sock"))
            bindable = True
        except OSError:
            bindable = False
    assert not bindable, "a unix socket under the long TMPDIR should not be bindable"
    with _running(Dvara(tmp_path, secantus.address, env={"TMPDIR": str(long_tmp)})) as proxy:
        pid = proxy.pid
        with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
            assert client.admin.command("ping")["ok"] == 1.0
            proxy.send_signal(signal.SIGUSR2)
            wait_until(lambda: _exited_or_logged(proxy, RESTART_FAILED),
                       "dvara to log the failed restart", RELOAD_WAIT)
            assert proxy.proc.poll() is None, \
                f"dvara exited ({proxy.proc.returncode}) on SIGUSR2:\n{proxy.log()[-2000:]}"
            assert client.admin.command("ping")["ok"] == 1.0
        assert proxy.pid == pid and _ping(proxy) == 1.0
        assert _listening_pids(proxy.port) == {pid}, "another process listens on dvara's port"


def _listening_pids(port: int) -> set[int]:
    out = subprocess.run(["ss", "-ltnpH", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+),", out)}


def test_every_setting_sighup_applies_takes_effect(secantus, tmp_path: Path):
    """Not the log line: the effect. After one SIGHUP the pool is bounded by the new
    max-connections, the new max-client-connections turns a client away, the new
    client-idle-timeout closes an idle client, the new worker-linger and message-timeout
    are what clients see (/status config), all without a restart."""
    admin = f"127.0.0.1:{free_port()}"
    conf = tmp_path / "dvara.conf"
    conf.write_text(f"admin-addr = {admin}\nmax-connections = 5\n")
    with _running(Dvara(tmp_path, secantus.address, "-c", str(conf))) as proxy:
        def status() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as reply:
                return json.loads(reply.read())

        assert status()["members"][0]["pool"]["max"] == 5
        conf.write_text(f"admin-addr = {admin}\nmax-connections = 2\n"
                        "max-client-connections = 2\nclient-idle-timeout = 1s\n"
                        "worker-linger = 0\nmessage-timeout = 7s\n")
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: status()["members"][0]["pool"]["max"] == 2, "the new pool bound")
        config = status()["config"]
        assert (config["worker_linger"], config["message_timeout"]) == (0.0, 7.0)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as first, \
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as second, \
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as third:
            assert third.recv(1) == b""                    # the third is turned away
            for idle in (first, second):                   # the others idle out in ~1s
                idle.settimeout(5)
                assert idle.recv(1) == b""
        assert metric_sum(admin, "clients.rejected") == 1
        assert metric_sum(admin, "clients.idle_timeouts") == 2
