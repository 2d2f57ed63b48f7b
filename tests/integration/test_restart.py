"""Graceful restart (SIGUSR2), shutdown (SIGTERM), reload (SIGHUP), pidfile and cron."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.helpers import ROOT, Dvara, RawClient, wait_until


def _pid(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.waitpid(pid, os.WNOHANG)   # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _stop_current(pidfile: Path, proxy: Dvara) -> None:
    """Stop whichever dvara the pidfile names now (restarts replace the one we started)."""
    current = _pid(pidfile)
    if current and _alive(current):
        os.kill(current, signal.SIGTERM)
        wait_until(lambda: not _alive(current), "the last dvara to stop", 30)
    proxy.stop()


class Load:
    """threads inserting unique documents with retryable writes until stopped."""

    def __init__(self, client: MongoClient, threads: int) -> None:
        self.coll = client.restart.docs
        self.acked: list[str] = []
        self.failed: list[str] = []
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(threads)]

    def _run(self, n: int) -> None:
        for i in range(100_000):
            if self.halt.is_set():
                return
            key = f"{n}-{i}"
            try:
                self.coll.insert_one({"_id": key})
                self.acked.append(key)
            except PyMongoError as exc:
                self.failed.append(f"{key}: {exc!r}")

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(60)


class Connector(threading.Thread):
    """Connects to a port over and over; counts refusals."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.refused, self.ok = port, 0, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and self.ok < 1_000_000:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                self.ok += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                pass
            time.sleep(0.005)


def test_five_graceful_restarts_under_load(secantus, tmp_path: Path):
    pidfile = tmp_path / "dvara.pid"
    proxy = Dvara(tmp_path, secantus.address, "--pidfile", str(pidfile),
                  "--max-connections", "8", "--graceful-timeout", "20s")
    idle = RawClient(proxy.port, timeout=30)
    legacy = RawClient(proxy.port, timeout=30)
    assert idle.command({"ping": 1})["ok"] == 1.0
    assert legacy.legacy_command({"isMaster": 1})["ismaster"] is True
    connector = Connector(proxy.port)
    connector.start()
    try:
        with MongoClient(proxy.uri(retryWrites="true"), maxPoolSize=60,
                         serverSelectionTimeoutMS=30000) as client, Load(client, 50) as load:
            pids = [_pid(pidfile)]
            for n in range(5):
                wait_until(lambda: len(load.acked) > 50 + 100 * len(pids), "load to run", 60)
                if n == 0:   # what an operator runs: signal, then wait until the new one serves
                    subprocess.run([str(ROOT / "scripts" / "dvara-restart"), str(pidfile), "60"],
                                   check=True, timeout=90)
                else:
                    os.kill(pids[-1], signal.SIGUSR2)
                new = wait_until(lambda: _pid(pidfile) not in (0, *pids) and _pid(pidfile),
                                 "a new process in the pidfile", 60)
                wait_until(lambda: not _alive(pids[-1]), "the old process to exit", 40)
                pids.append(new)
                assert idle.command({"ping": 1})["ok"] == 1.0
                assert legacy.legacy_command({"isMaster": 1})["ismaster"] is True
            load.halt.set()
        assert load.failed == [], load.failed[:3]
        with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as check:
            stored = [d["_id"] for d in check.restart.docs.find({}, {"_id": 1})]
        assert len(stored) == len(set(stored))
        assert set(load.acked) <= set(stored)
        assert len(set(pids)) == 6
    finally:
        connector.halt.set()
        connector.join(10)
        idle.close()
        legacy.close()
        _stop_current(pidfile, proxy)
    assert connector.refused == 0 and connector.ok > 0


def test_sigterm_under_load_finishes_in_flight_and_exits_0(secantus, tmp_path: Path):
    proxy = Dvara(tmp_path, secantus.address, "--max-connections", "4")
    with MongoClient(proxy.uri(retryWrites="false"), serverSelectionTimeoutMS=5000) as client:
        with Load(client, 10) as load:
            wait_until(lambda: len(load.acked) > 50, "load to run", 30)
            proxy.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(30) == 0
    with MongoClient(f"mongodb://{secantus.address}/?directConnection=true") as direct:
        stored = {d["_id"] for d in direct.restart.docs.find()}
    assert set(load.acked) <= stored
    assert "received SIGTERM; draining" in proxy.log()


def test_sighup_applies_live_settings(secantus, tmp_path: Path):
    conf = tmp_path / "dvara.conf"
    conf.write_text("max-connections = 4\nlog-level = info\n")
    proxy = Dvara(tmp_path, secantus.address, "-c", str(conf))
    conf.write_text("max-connections = 9\nlog-level = debug\nworkers = 3\n")
    proxy.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: applied" in proxy.log(), "the reload", 10)
    log = proxy.log()
    assert "log-level, max-connections" in log
    assert "workers changed; it takes effect on a restart" in log
    conf.write_text("no-such-option = 1\n")
    proxy.send_signal(signal.SIGHUP)
    wait_until(lambda: "nothing changed" in proxy.log(), "the rejected reload", 10)
    raw = RawClient(proxy.port)
    assert raw.command({"ping": 1})["ok"] == 1.0
    raw.close()
    proxy.stop()


def test_failed_restart_keeps_the_old_process_serving(secantus, tmp_path: Path):
    conf = tmp_path / "dvara.conf"
    conf.write_text("max-connections = 4\n")
    proxy = Dvara(tmp_path, secantus.address, "-c", str(conf))
    raw = RawClient(proxy.port)
    conf.write_text("max-connections = -1\n")   # the new process will refuse to start
    proxy.send_signal(signal.SIGUSR2)
    wait_until(lambda: "this one keeps serving" in proxy.log(), "the failed restart", 60)
    assert proxy.proc.poll() is None
    assert raw.command({"ping": 1})["ok"] == 1.0
    raw.close()
    proxy.stop()


def test_second_dvara_on_the_same_pidfile_refuses(secantus, tmp_path: Path, start_dvara):
    pidfile = tmp_path / "dvara.pid"
    first = start_dvara(secantus.address, "--pidfile", str(pidfile))
    second = start_dvara(secantus.address, "--pidfile", str(pidfile), wait=False)
    assert second.proc.wait(30) == 1
    assert f"another dvara (pid {first.pid}) is running" in second.log()
    assert _pid(pidfile) == first.pid
    first.stop()
    assert not pidfile.exists()


def test_cron_script_started_twice_starts_one_dvara(secantus, tmp_path: Path):
    pidfile = tmp_path / "dvara.pid"
    conf = tmp_path / "dvara.conf"
    base = 20000 + os.getpid() % 10000
    conf.write_text(f"addrs = {secantus.address}\npidfile = {pidfile}\n"
                    f"port-start = {base}\nport-end = {base + 2}\n"
                    f"log-file = {tmp_path / 'dvara.log'}\n")
    env = {**os.environ, "DVARA_CONF": str(conf)}
    runs = [subprocess.Popen([str(ROOT / "scripts" / "dvara-cron")], env=env, cwd=tmp_path)
            for _ in range(2)]
    try:
        assert [r.wait(60) for r in runs] == [0, 0]
        pid = wait_until(lambda: _pid(pidfile), "dvara to write its pidfile", 60)
        assert subprocess.run([str(ROOT / "scripts" / "dvara-cron")], env=env,
                              timeout=60).returncode == 0
        assert _pid(pidfile) == pid
        out = subprocess.run(["pgrep", "-f", f"dvara.py -c {conf}"], capture_output=True,
                             text=True).stdout.split()
        assert out == [str(pid)]
    finally:
        pid = _pid(pidfile)
        if pid:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not _alive(pid), "dvara to stop", 30)


def test_logged_in_and_legacy_clients_move_with_their_state(secantus, tmp_path: Path):
    from tests.secure_helpers import adduser, raw_login
    users, pidfile = tmp_path / "users.json", tmp_path / "dvara.pid"
    assert adduser(users, "app", "s3cret").returncode == 0
    proxy = Dvara(tmp_path, secantus.address, "--client-auth-file", str(users),
                  "--pidfile", str(pidfile))
    logged_in, legacy_client = RawClient(proxy.port, timeout=30), RawClient(proxy.port, 30)
    try:
        assert raw_login(logged_in, "app", "s3cret")["ok"] == 1.0
        assert raw_login(legacy_client, "app", "s3cret")["ok"] == 1.0
        assert logged_in.command({"ping": 1}, "admin")["ok"] == 1.0
        first = legacy_client.legacy_command({"getLastError": 1})   # answered by the proxy
        old = proxy.pid
        proxy.send_signal(signal.SIGUSR2)
        wait_until(lambda: _pid(pidfile) not in (0, old), "the new process", 60)
        wait_until(lambda: not _alive(old), "the old process to exit", 40)
        # same sockets, still logged in: a command that needs a login works
        assert logged_in.command({"listDatabases": 1}, "admin")["ok"] == 1.0
        again = legacy_client.legacy_command({"getLastError": 1})
        assert again["ok"] == 1.0 and again["n"] == first["n"] == 0
        assert "handed to the new process" in proxy.log() or "took over 2" in proxy.log()
    finally:
        logged_in.close()
        legacy_client.close()
        _stop_current(pidfile, proxy)
