"""The pool bounds what the server sees, and every wait ends with an answer."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from pymongo import MongoClient

from dvara_lib import wire
from tests.helpers import ROOT, Secantus, wait_until

MONITORING = 1  # dvara's own monitoring connection per member


class _ConnectionSampler(threading.Thread):
    """Samples the backend's established connections until stopped; keeps the max."""

    def __init__(self, backend: Secantus) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.max = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02) and self.samples < 100_000:
            self.max = max(self.max, self.backend.connections())
            self.samples += 1

    def stop(self) -> int:
        self._halt.set()
        self.join(10)
        return self.max


def test_200_threads_share_four_server_connections(fresh_secantus, start_dvara):
    proxy = start_dvara(fresh_secantus.address, "--max-connections", "4")
    sampler = _ConnectionSampler(fresh_secantus)
    sampler.start()
    errors: list[BaseException] = []
    done = []
    with MongoClient(proxy.uri(), maxPoolSize=200, serverSelectionTimeoutMS=10000) as client:
        coll = client.limits.c

        def work(n: int) -> None:
            try:
                for i in range(5):
                    coll.insert_one({"_id": f"{n}-{i}"})
                    assert coll.find_one({"_id": f"{n}-{i}"}) is not None
                done.append(n)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = sampler.stop()
        assert not errors, errors[:3]
        assert len(done) == 200
        assert coll.count_documents({}) == 1000
    assert sampler.samples > 0
    assert 1 <= peak <= 4 + MONITORING, f"backend saw {peak} connections"


def test_1000_idle_clients_cost_no_threads_or_server_connections(fresh_secantus, start_dvara):
    proxy = start_dvara(fresh_secantus.address, "--max-connections", "4", "--workers", "8")
    threads_before = proxy.threads()
    loaders = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "idle_clients.py"),
                                 proxy.uri(), "250", "30"], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT) for _ in range(4)]
    try:
        for loader in loaders:
            assert loader.stdout.readline().strip() == "ready 250"
        sampler = _ConnectionSampler(fresh_secantus)
        sampler.start()
        threads_during = proxy.threads()
        for loader in loaders:
            assert loader.stdout.readline().strip() == "done"
            assert loader.wait(30) == 0
        peak = sampler.stop()
    finally:
        for loader in loaders:
            loader.kill()
            loader.wait(10)
            loader.stdout.close()
    assert threads_during == threads_before
    assert peak <= 4 + MONITORING, f"backend saw {peak} connections"


def _w0_insert(doc: dict) -> bytes:
    return wire.op_msg({"insert": "c", "documents": [doc], "writeConcern": {"w": 0},
                        "$db": "limits"}, flags=wire.MORE_TO_COME)


def test_pool_exhaustion_gives_an_error_reply(secantus, start_dvara, raw_client):
    proxy = start_dvara(secantus.address, "--max-connections", "1", "--pool-wait-timeout", "1s")
    holder = raw_client(proxy.port)
    holder.send(_w0_insert({"x": 1}))       # pins the only server connection to holder
    waiter = raw_client(proxy.port)
    start = time.monotonic()
    reply = waiter.command({"ping": 1})
    waited = time.monotonic() - start
    assert reply["ok"] == 0 and reply["code"] == 262, reply
    assert "RetryableWriteError" in reply["errorLabels"]
    assert "timed out waiting for a connection" in reply["errmsg"]
    assert 0.9 <= waited < 8, waited
    assert holder.command({"ping": 1})["ok"] == 1.0   # runs on the pin, then releases it
    assert waiter.command({"ping": 1})["ok"] == 1.0


def test_stopped_backend_frees_workers_after_message_timeout(fresh_secantus, start_dvara,
                                                             raw_client):
    proxy = start_dvara(fresh_secantus.address, "--message-timeout", "2s", "--workers", "2",
                        "--max-connections", "2")
    clients = [raw_client(proxy.port, timeout=20) for _ in range(2)]
    for c in clients:
        assert c.command({"ping": 1})["ok"] == 1.0
    fresh_secantus.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        for c in clients:
            c.send(wire.op_msg({"ping": 1, "$db": "admin"}))
        for c in clients:
            outcome = c.outcome(timeout=15)
            assert outcome == "closed" or outcome["ok"] == 0, outcome
        assert time.monotonic() - start < 15
    finally:
        fresh_secantus.send_signal(signal.SIGCONT)
    fresh = raw_client(proxy.port)
    assert wait_until(lambda: fresh.command({"ping": 1})["ok"] == 1.0, "a worker to serve", 20)
    assert "did not answer within" in proxy.log()
