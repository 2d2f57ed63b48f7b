"""Test helpers: free ports, wait-until, real backends and dvara as subprocesses, raw clients."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import bson
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from dvara_lib import wire
from dvara_lib.observe.admin import prometheus_name

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 10.0,
               step: float = 0.02) -> Any:
    """Poll predicate until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def metric_sum(admin: str, measure: str) -> float:
    """A counter's total or a gauge's value from dvara's /metrics at admin, summed over
    members."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = {prometheus_name(measure), prometheus_name(measure) + "_total"}
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name in wanted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of count consecutive free ports, below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port range found")


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        candidate = Path(sys.executable).with_name(tool)
        if candidate.exists():
            return str(candidate)
        raise AssertionError(f"{tool} is not installed: run pip install -e '.[test]' "
                             "and apt-get install -y ganglia-monitor")
    return path


def _all_stopped(pid: int) -> bool:
    """Whether every thread of pid is stopped (state T or t in /proc)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        states = [(t / "stat").read_text().rpartition(")")[2].split()[0] for t in tasks]
    except (OSError, IndexError):
        return False
    return bool(states) and all(state in ("T", "t") for state in states)


class LoadThread:
    """A thread calling step() through a MongoClient until the with block ends; what
    step() raises is kept in ``errors`` (for the test to assert on) and the loop goes on."""

    def __init__(self, uri: str, name: str) -> None:
        self.client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=10000)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> "LoadThread":
        self.client.admin.command("ping")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:
                self.errors.append(exc)
                self._stop.wait(0.05)

    def step(self) -> None:
        raise NotImplementedError


class Process:
    """A child process with its output in a log file; stopped by stop() (or a with block).

    The child writes the log through its own copy of the descriptor: ours is closed as
    soon as the child is started, so nothing is left open when a test only waits for the
    child to exit, or when starting it fails.
    """

    def __init__(self, argv: list[str], log_path: Path, env: Optional[dict] = None) -> None:
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                         start_new_session=True)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        """Signal the child; a SIGSTOP returns once every thread of it has stopped (the
        kernel stops a thread running on another CPU only at its next kernel entry)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGSTOP:
                wait_until(lambda: _all_stopped(self.proc.pid), f"pid {self.proc.pid} to stop", 5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Optional[int]:
        """Signal the child (once resumed, if stopped) and reap it; its exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def _started(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until ready() or the child exits; a child that is not ready is stopped."""
        try:
            wait_until(lambda: ready() or self.proc.poll() is not None, what, timeout)
            assert self.proc.poll() is None, self.log()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise


class Secantus(Process):
    """A SecantusDB server on 127.0.0.1:port (a real MongoDB wire-protocol server)."""

    def __init__(self, tmp: Path, port: Optional[int] = None, *extra: str) -> None:
        self.port = port or free_port()
        self.tmp = tmp
        self.extra = extra
        super().__init__(self._argv(), tmp / f"secantus-{self.port}.log")
        self._started(self._listening, "SecantusDB to listen", 60)

    def _argv(self) -> list[str]:
        return [require("secantusd-py"), "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", ":memory:", "--log-level", "WARNING", *self.extra]

    def _listening(self) -> bool:
        """Our own process listens on the port (not another test's server on a reused port)."""
        out = subprocess.run(["ss", "-ltnpH", f"( sport = :{self.port} )"],
                             capture_output=True, text=True).stdout
        return f"pid={self.pid}," in out

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connections(self) -> int:
        """Established TCP connections on the server's port (as the server sees them)."""
        out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{self.port} )"],
                             capture_output=True, text=True, check=True).stdout
        return len([line for line in out.splitlines() if line.strip()])


class Dvara(Process):
    """dvara run as an operator runs it: python dvara.py with flags.

    launcher: a script run in place of dvara.py with the same flags (tests/inject.py).
    """

    def __init__(self, tmp: Path, addrs: str, *args: str, ports: int = 3,
                 env: Optional[dict] = None, wait: bool = True,
                 port_start: Optional[int] = None, launcher: Optional[Path] = None) -> None:
        self.port_start = port_start or free_port_range(ports)
        self.port = self.port_start
        argv = [sys.executable, str(launcher or ROOT / "dvara.py"), "--addrs", addrs,
                "--port-start", str(self.port_start),
                "--port-end", str(self.port_start + ports - 1),
                "--discovery-interval", "500ms", *args]
        full_env = {**os.environ, **(env or {})}
        super().__init__(argv, tmp / f"dvara-{self.port_start}.log", full_env)
        if wait:
            self._started(lambda: "dvara is ready" in self.log(), "dvara to start", 60)

    def uri(self, **options: Any) -> str:
        line = next(l for l in self.log().splitlines() if "connect with:" in l)
        uri = line.split("connect with: ", 1)[1].strip()
        extra = "".join(f"&{k}={v}" for k, v in options.items())
        return uri + extra

    def threads(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(l for l in status.splitlines() if l.startswith("Threads:")).split()[1])


class RawClient:
    """A client that speaks raw wire frames over a plain socket; close() it, or use it in a
    with block (or the raw_client fixture, which closes every client at teardown)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> bytes:
        return wire.read_frame(self.sock)

    def command(self, doc: dict[str, Any], db: str = "admin") -> dict[str, Any]:
        request = wire.op_msg({**doc, "$db": db})
        self.send(request)
        reply = self.recv_frame()
        assert wire.response_to(reply) == wire.request_id(request)
        return wire.decode_msg_body(reply)

    def legacy_command(self, doc: dict[str, Any], db: str = "admin") -> dict[str, Any]:
        request = wire.op_query(f"{db}.$cmd", doc)
        self.send(request)
        reply = self.recv_frame()
        assert wire.opcode(reply) == wire.OP_REPLY
        return wire.decode_reply(reply)[3][0]

    def outcome(self, timeout: float) -> Any:
        """"closed" if the proxy closes the connection, else the reply document it sends."""
        self.sock.settimeout(timeout)
        try:
            return wire.reply_document(self.recv_frame())
        except wire.ServerTimeout:
            return "no answer"
        except wire.ConnectionFailure:
            return "closed"

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the proxy has closed this connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def encode(doc: dict[str, Any]) -> bytes:
    return bson.encode(doc)


class Router(Process):
    """A test mongos router (tests/router_peer.py) on a free port in front of backend;
    each request it relays is logged to log (router_peer.read_log reads it)."""

    def __init__(self, tmp: Path, backend: str, name: str, log: Path,
                 port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.name = name
        argv = [sys.executable, str(ROOT / "tests" / "router_peer.py"), "--port", str(self.port),
                "--backend", backend, "--name", name, "--log", str(log)]
        super().__init__(argv, tmp / f"router-{name}-{self.port}.log")
        self._started(lambda: f"router {name} ready" in self.log(), "the test router", 30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
