"""Shared parts of scripts/bench.py and scripts/bench_idle.py (not a program of its own).

Processes (started in their own session, stopped by id at exit), /proc accounting over a
process tree, the canned backend, the proxies under test (haproxy, the floor relay, dvara
variants run from a snapshot of the source), OP_MSG frames, and the run's description.
It imports nothing from dvara_lib, so the load side never runs code that is being edited.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import io
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Optional

import bson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "scripts")
DEFAULT_FLOOR = os.path.join(os.path.dirname(ROOT), "shared", "tools", "floor_relay.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 60.0
OP_MSG = 2013
_HEADER = struct.Struct("<iiii")


# --------------------------------------------------------------------------- sockets, frames

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} did not accept within {timeout:.0f}s")


def op_msg(doc: dict, request_id: int) -> bytes:
    """One OP_MSG frame: flagBits 0, one kind-0 section holding doc."""
    body = b"\x00\x00\x00\x00\x00" + bson.encode(doc)
    return _HEADER.pack(16 + len(body), request_id, 0, OP_MSG) + body


def reply_doc(frame: bytes) -> dict:
    """The body document of an OP_MSG reply frame (kind-0 section first)."""
    return bson.decode(frame[21:])


def read_frame(sock: socket.socket) -> bytes:
    """One whole wire-protocol frame from a blocking socket."""
    data = b""
    need = 4
    while len(data) < need:
        chunk = sock.recv(max(need - len(data), 65536))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        data += chunk
        if need == 4 and len(data) >= 4:
            need = struct.unpack_from("<i", data)[0]
    return data


# --------------------------------------------------------------------------- /proc

def _stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (after the command name)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _all_processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in ticks) for every process we can read."""
    out = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            f = _stat_fields(int(path.split("/")[2]))
        except (OSError, ValueError, IndexError):
            continue   # gone meanwhile
        out[int(path.split("/")[2])] = (int(f[1]), sum(int(x) for x in f[11:15]))
    return out


def _descendants(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root] if root in table else []
    while todo and len(found) < 10_000:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_pids(root: int) -> list[int]:
    """root and every live descendant (found through the ppid of /proc/*/stat)."""
    return _descendants(root, _all_processes())


def cpu_table() -> dict[int, tuple[int, int]]:
    """One scan of /proc, for tree_cpu() and others_cpu() at one instant."""
    return _all_processes()


def others_cpu(own_root: int, table: dict[int, tuple[int, int]]) -> float:
    """CPU seconds (cumulative, as in tree_cpu) of every user-space process outside
    own_root's tree; kernel threads (kthreadd, pid 2, and its children, e.g. ksoftirqd
    carrying our own loopback traffic) are left out."""
    skip = set(_descendants(own_root, table)) | set(_descendants(2, table))
    return sum(cpu for pid, (_, cpu) in table.items() if pid not in skip) / CLK_TCK


def tree_cpu(root: int, table: Optional[dict[int, tuple[int, int]]] = None) -> float:
    """CPU seconds of a process tree: the sum, over root and its live descendants, of
    utime + stime + cutime + cstime.

    Sampled at both ends of a window, the difference counts every tree member's CPU in
    it: a child born mid-window starts from zero and is in the end sample; a child that
    exits mid-window and is reaped by its (tree member) parent moves its whole time into
    that parent's cutime/cstime, so it is still in the end sample. Lost: a child reaped
    outside the tree (orphaned to init) between the two samples.
    """
    table = _all_processes() if table is None else table
    return sum(table[p][1] for p in _descendants(root, table)) / CLK_TCK


def tree_status(root: int) -> dict[str, int]:
    """Summed VmRSS (KB) and thread count over root's process tree, and its size."""
    rss = threads = n = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
        rss += int(m.group(1)) if m else 0
        m = re.search(r"^Threads:\s+(\d+)", text, re.M)
        threads += int(m.group(1)) if m else 0
        n += 1
    return {"rss_kb": rss, "threads": threads, "processes": n}


def system_cpu() -> tuple[int, int, int]:
    """(busy, total, stolen) jiffies of the whole machine, from /proc/stat. Stolen: time
    the hypervisor gave this VM's CPUs to others while they had work (it slows everything,
    and a process's CPU time then counts part of the wait)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total, vals[7] if len(vals) > 7 else 0


def background_busy(seconds: float = 1.0) -> float:
    """Percent of the machine's CPU busy over a short sample."""
    b0, t0, _ = system_cpu()
    time.sleep(seconds)
    b1, t1, _ = system_cpu()
    return 100.0 * (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(max_wait: float, threshold: float) -> tuple[float, float]:
    """Wait (at most max_wait s) until the machine is below threshold % busy.
    Returns (last busy % seen, seconds waited)."""
    t0 = time.monotonic()
    deadline = t0 + max_wait
    busy = background_busy(1.0)
    while busy > threshold and time.monotonic() < deadline:
        busy = background_busy(1.0)
    return busy, time.monotonic() - t0


# --------------------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child if the benchmark dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


class Procs:
    """Every subprocess the benchmark starts, each in its own session (so its descendants
    share its process group); stop() ends one by id, stop_all() all of them in reverse."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self._n = 0

    def start(self, name: str, args: list[str], cwd: str = ROOT) -> subprocess.Popen:
        self._n += 1
        base = os.path.join(self.logdir, f"{self._n:02d}-{name}")
        with open(base + ".out", "wb") as fo, open(base + ".err", "wb") as fe:
            proc = subprocess.Popen(args, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                    cwd=cwd, preexec_fn=_die_with_parent,
                                    start_new_session=True)
        proc.log_base = base   # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        """SIGTERM the process and wait; then SIGKILL it and each descendant seen before the
        SIGTERM that is still alive in its process group (by pid, never by name)."""
        members = tree_pids(proc.pid)[1:] if proc.poll() is None else []
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        leftovers = members + ([proc.pid] if proc.poll() is None else [])
        for pid in leftovers:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == proc.pid:   # still ours (start_new_session)
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def log_tail(proc: subprocess.Popen, n: int = 2000) -> str:
    with contextlib.suppress(OSError), open(proc.log_base + ".err", errors="replace") as f:  # type: ignore[attr-defined]
        return f.read()[-n:]
    return ""


# --------------------------------------------------------------------------- backend

class Target:
    """Something clients connect to: the backend itself or a proxy in front of it.
    proc is None for "direct" (no proxy, no proxy CPU)."""

    def __init__(self, name: str, kind: str, port: int,
                 proc: Optional[subprocess.Popen]) -> None:
        self.name, self.kind, self.port, self.proc = name, kind, port, proc


def start_backend(procs: Procs, workdir: str) -> tuple[Target, str]:
    """The C canned backend, compiled with cc -O2 into workdir; canned_backend.py if there
    is no compiler. Returns the backend and a description of which one runs."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import canned_backend   # noqa: E402  (scripts/, for hello_doc)
    port = free_port()
    exe = os.path.join(workdir, "canned_backend")
    cc = shutil.which("cc") or shutil.which("gcc")
    built = cc and subprocess.run([cc, "-O2", "-o", exe, os.path.join(HERE, "canned_backend.c")],
                                  capture_output=True, timeout=120).returncode == 0
    if built:
        hello = os.path.join(workdir, "hello.bson")
        with open(hello, "wb") as f:
            f.write(bson.encode(canned_backend.hello_doc(port)))
        proc = procs.start("backend", [exe, str(port), hello])
        what = "canned C backend (scripts/canned_backend.c, cc -O2)"
    else:
        print("note: no C compiler (or the build failed); using scripts/canned_backend.py, "
              "which costs far more CPU per message", file=sys.stderr)
        proc = procs.start("backend", [sys.executable, os.path.join(HERE, "canned_backend.py"),
                                       "--port", str(port)])
        what = "canned Python backend (scripts/canned_backend.py; no C compiler)"
    wait_port(port, START_TIMEOUT, proc)
    return Target("backend", "backend", port, proc), what


# --------------------------------------------------------------------------- proxies

HAPROXY_CFG = """global
    no strict-limits
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend bench
    bind 127.0.0.1:{port}
    default_backend canned
backend canned
    server canned 127.0.0.1:{backend}
"""


def start_haproxy(procs: Procs, backend: Target, workdir: str, exe: str) -> Target:
    port = free_port()
    cfg = os.path.join(workdir, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(HAPROXY_CFG.format(port=port, backend=backend.port))
    proc = procs.start("haproxy", [exe, "-f", cfg, "-db"])
    wait_port(port, START_TIMEOUT, proc)
    return Target("haproxy", "haproxy", port, proc)


def start_floor(procs: Procs, backend: Target, script: str) -> Target:
    port = free_port()
    proc = procs.start("floor", [sys.executable, script, str(port), str(backend.port)])
    wait_port(port, START_TIMEOUT, proc)
    return Target("floor", "floor", port, proc)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name=extra dvara args' -> (name, args)."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,20}", name):
        raise ValueError(f"--dvara-variant {text!r}: expected NAME=ARGS (NAME: letters, "
                         "digits, _.+-)")
    return name, shlex.split(rest)


def start_dvara(procs: Procs, script: str, backend: Target, name: str,
                extra: list[str]) -> Target:
    """dvara (from the snapshot) in front of the backend, one listener; waits for its
    ready line."""
    port = free_port()
    cmd = [sys.executable, script, "--addrs", f"127.0.0.1:{backend.port}",
           "--port-start", str(port), "--port-end", str(port), "--log-level", "warning",
           "--graceful-timeout", "2s", *extra]
    proc = procs.start(f"dvara-{name}", cmd, cwd=os.path.dirname(script))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with open(proc.log_base + ".out", errors="replace") as f:   # type: ignore[attr-defined]
            if "dvara is ready" in f.read():
                wait_port(port, START_TIMEOUT, proc)
                return Target(name, "dvara", port, proc)
        if proc.poll() is not None:
            raise RuntimeError(f"dvara {name} exited with {proc.returncode}:\n{log_tail(proc)}")
        time.sleep(0.05)
    procs.stop(proc)
    raise RuntimeError(f"dvara {name} did not print its ready line in {START_TIMEOUT:.0f}s")


# --------------------------------------------------------------------------- the run

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_info(ref: Optional[str]) -> dict[str, str]:
    """Which dvara source is measured: a commit, plus local changes when it is the tree."""
    commit = _git("rev-parse", "--short", ref or "HEAD") or "unknown"
    describe = _git("describe", "--always", "--tags", "--dirty") or "unknown"
    if ref:
        return {"commit": commit, "describe": describe, "source": f"commit {commit} "
                f"(--dvara-ref {ref})"}
    dirty = _git("status", "--porcelain", "--", "dvara.py", "dvara_lib").splitlines()
    extra = f" plus {len(dirty)} changed/new file(s)" if dirty else ""
    changed = _git("log", "-1", "--format=%h", "--", "dvara.py", "dvara_lib") or "unknown"
    return {"commit": commit, "describe": describe, "source_commit": changed,
            "source": f"working tree at commit {commit}, dvara's code as of {changed}{extra}"}


def _extract_ref(dest: str, ref: str) -> None:
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", ref, "dvara.py",
                              "dvara_lib"], capture_output=True, timeout=60)
    if archive.returncode:
        raise RuntimeError(f"git archive {ref}: {archive.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def snapshot_dvara(dest: str, ref: Optional[str] = None) -> str:
    """Copy dvara.py and dvara_lib/ to dest (from the working tree, or from commit ref), so
    edits made during the run do not mix in. Retries a few times while the copy does not
    start (a file caught mid-edit). Returns the path of the copied dvara.py."""
    last = ""
    for _ in range(6):
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        if ref:
            _extract_ref(dest, ref)
        else:
            shutil.copy2(os.path.join(ROOT, "dvara.py"), dest)
            shutil.copytree(os.path.join(ROOT, "dvara_lib"), os.path.join(dest, "dvara_lib"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        check = subprocess.run([sys.executable, "dvara.py", "--help"], cwd=dest,
                               capture_output=True, text=True, timeout=60)
        if check.returncode == 0:
            return os.path.join(dest, "dvara.py")
        last = check.stderr[-1500:]
        if ref:
            break
        time.sleep(5)
    raise RuntimeError(f"dvara's code does not start:\n{last}")


def machine_info() -> dict[str, Any]:
    model, load = "unknown", "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.lower().startswith("model name")), model)
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "kernel": platform.release(),
            "hostname": socket.gethostname(), "loadavg_at_start": load,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def tool_version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "absent"
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else (out.strip().splitlines() or ["?"])[0]


def make_workdir() -> str:
    return tempfile.mkdtemp(prefix="dvara-bench-")


def on_sigterm_raise() -> Any:
    """SIGTERM and SIGINT raise KeyboardInterrupt (so the same cleanup runs; SIGINT too, as
    a shell starts background jobs with it ignored); returns the old SIGTERM handler."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return signal.signal(signal.SIGTERM, handler)
