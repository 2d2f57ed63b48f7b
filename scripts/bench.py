#!/usr/bin/env python3
"""Benchmark dvara: the same load direct to a backend and through dvara, side by side.

    python scripts/bench.py [--duration 3] [--concurrency 1,16,64]
                            [--workloads pymongo,raw] [--dvara-workers N]
                            [--max-connections 8] [--quiet-wait 20] [--json FILE]
                            [--dvara-ref COMMIT]

Workloads (each at every concurrency, i.e. that many concurrent client connections):

- pymongo: threads in several processes loop over ping, a small insert_one and a
  find_one by the _id just inserted, against SecantusDB.
- raw: pre-encoded OP_MSG {ping: 1, $db: "admin"} frames over plain sockets (one epoll
  loop per process), against SecantusDB and against a canned-reply backend
  (scripts/canned_backend.py) that costs almost nothing per message, so the proxied
  number is dvara's own ceiling on this machine.

For every cell it reports ops/s, p50/p99 latency, their proxied/direct ratios, dvara's
CPU time per message it handled (utime+stime from /proc/<pid>/stat over the measured
window, divided by the change of dvara's own ``requests`` counter read from its admin
endpoint, or by the client-side count when that is unavailable), and the most backend
connections seen (``ss -tnH state established '( sport = :PORT )'``, sampled every
0.25 s during the window).

The machine is assumed shared: before each cell it waits (up to --quiet-wait seconds) for
the CPU to be less than --quiet-threshold % busy, and reports the background load it saw.

dvara runs from a copy of dvara.py and dvara_lib/ taken when the benchmark starts (from
the working tree, or from git with --dvara-ref), so edits made meanwhile do not mix in.

Everything it starts (backends, one fresh dvara per cell, load processes) listens on or
connects to 127.0.0.1 only and is stopped at exit, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
import io
import json
import multiprocessing as mp
import os
import platform
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dvara_lib import wire  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_LOAD_PROCS = 4
WARMUP_OPS = 20
START_TIMEOUT = 60.0
SS_INTERVAL = 0.25
# dvara counters read from /metrics (admin endpoint) before and after each window.
DVARA_COUNTERS = ("requests", "requests_with_reply", "hello_answered", "errors_proxy",
                  "errors_timeout", "errors_bad_frame", "server_created", "server_closed",
                  "server_checkout_timeouts", "clients_rejected")


# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} did not accept within {timeout:.0f}s")


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK   # fields 14 and 15 of stat


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (all its threads)."""
    return sum(proc_cpu_split(pid))


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


def background_busy(seconds: float = 1.0) -> float:
    """Percent of the machine's CPU busy over a short sample, before the benchmark loads it."""
    b0, t0 = system_cpu()
    time.sleep(seconds)
    b1, t1 = system_cpu()
    return 100.0 * (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (at most max_wait s) until the machine is below threshold % busy; return the last
    reading (the background load just before a cell)."""
    deadline = time.monotonic() + max_wait
    busy = background_busy(1.0)
    while busy > threshold and time.monotonic() < deadline:
        busy = background_busy(1.0)
    return busy


def count_established(port: int) -> int:
    """Established TCP connections whose local port is port (server side)."""
    if shutil.which("ss"):
        try:
            out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                                 capture_output=True, text=True, timeout=5).stdout
            return sum(1 for line in out.splitlines() if line.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except OSError:
            pass
    return n


class ConnSampler(threading.Thread):
    """Samples count_established(port) every SS_INTERVAL until stopped; keeps the max."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.max = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.max = max(self.max, count_established(self.port))
            self.samples += 1
            self._halt.wait(SS_INTERVAL)

    def stop(self) -> int:
        self._halt.set()
        self.join(10)
        self.max = max(self.max, count_established(self.port)) if self.samples == 0 else self.max
        return self.max


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    idx = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[idx]


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import pymongo
        pymongo_version = pymongo.version
    except ImportError:
        pymongo_version = "absent"
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pymongo": pymongo_version,
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "loadavg_at_start": load,
    }


def dvara_source_info(ref: Optional[str] = None) -> str:
    """The commit dvara's code was taken from, and whether it had local changes."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref or "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "dvara.py",
                                "dvara_lib"], capture_output=True, text=True,
                               timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (no git)"
    if ref:
        return f"commit {head} (--dvara-ref {ref})"
    return f"commit {head}" + (f" plus {len(dirty)} changed/new file(s) in dvara_lib"
                               if dirty else "")


def snapshot_dvara(dest: str, ref: Optional[str] = None) -> str:
    """Copy dvara.py and dvara_lib/ to dest (so edits made during the run do not mix in),
    from the working tree, or from commit ref (``git archive``).

    Retries a few times while the copy does not import (a file caught mid-edit).
    Returns the path of the copied dvara.py.
    """
    last = ""
    for _ in range(6):
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        if ref:
            archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", ref,
                                      "dvara.py", "dvara_lib"], capture_output=True, timeout=60)
            if archive.returncode:
                raise RuntimeError(f"git archive {ref}: {archive.stderr.decode()[-500:]}")
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:
                    tar.extractall(dest)
        else:
            shutil.copy2(os.path.join(ROOT, "dvara.py"), dest)
            shutil.copytree(os.path.join(ROOT, "dvara_lib"), os.path.join(dest, "dvara_lib"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        check = subprocess.run([sys.executable, "-c", "import dvara_lib.app, dvara_lib.server"],
                               cwd=dest, capture_output=True, text=True, timeout=60)
        if check.returncode == 0:
            return os.path.join(dest, "dvara.py")
        last = check.stderr[-1500:]
        time.sleep(5)
    raise RuntimeError(f"dvara's code does not import:\n{last}")


# --------------------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child if the benchmark dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Procs:
    """Every subprocess the benchmark starts; stop_all() ends them (TERM, then KILL)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self._n = 0

    def start(self, name: str, args: list[str],
              cwd: str = ROOT) -> tuple[subprocess.Popen, str, str]:
        self._n += 1
        out = os.path.join(self.logdir, f"{self._n:02d}-{name}.out")
        err = os.path.join(self.logdir, f"{self._n:02d}-{name}.err")
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(args, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                    cwd=cwd, preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc, out, err

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


class Backend:
    def __init__(self, name: str, port: int, proc: subprocess.Popen, err: str) -> None:
        self.name = name
        self.port = port
        self.proc = proc
        self.err = err


def start_secantus(procs: Procs) -> Backend:
    exe = shutil.which("secantusd-py")
    if exe is None:
        raise RuntimeError("secantusd-py not found (pip install SecantusDB)")
    port = free_port()
    proc, _, err = procs.start("secantus", [exe, "--host", "127.0.0.1", "--port", str(port),
                                            "--storage-path", ":memory:", "--log-level",
                                            "WARNING"])
    wait_port(port, START_TIMEOUT, proc)
    return Backend("secantus", port, proc, err)


def start_canned(procs: Procs) -> Backend:
    port = free_port()
    proc, _, err = procs.start("canned", [sys.executable, os.path.join(HERE, "canned_backend.py"),
                                          "--port", str(port)])
    wait_port(port, START_TIMEOUT, proc)
    return Backend("canned", port, proc, err)


class Dvara:
    def __init__(self, proc: subprocess.Popen, uri: str, port: int,
                 admin_port: Optional[int], err: str) -> None:
        self.proc = proc
        self.uri = uri
        self.port = port
        self.admin_port = admin_port
        self.err = err

    def counters(self) -> Optional[dict[str, float]]:
        """dvara's counters (summed over members) from its /metrics, or None."""
        if self.admin_port is None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics",
                                        timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        out = {name: 0.0 for name in DVARA_COUNTERS}
        for line in text.splitlines():
            m = re.match(r"mongoproxy_([a-z_]+)_total(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
            if m and m.group(1) in out:
                out[m.group(1)] += float(m.group(2))
        return out


def start_dvara(procs: Procs, backend: Backend, args: argparse.Namespace) -> Dvara:
    port = free_port()
    script = getattr(args, "dvara_script", None) or os.path.join(ROOT, "dvara.py")
    cmd = [sys.executable, script, "--addrs", f"127.0.0.1:{backend.port}",
           "--port-start", str(port), "--port-end", str(port),
           "--max-connections", str(args.max_connections), "--log-level", "warning",
           "--graceful-timeout", "2s"]
    if args.dvara_workers:
        cmd += ["--workers", str(args.dvara_workers)]
    admin_port = None if args.no_admin else free_port()
    if admin_port is not None:
        cmd += ["--admin-addr", f"127.0.0.1:{admin_port}"]
    proc, out, err = procs.start("dvara", cmd, cwd=os.path.dirname(script))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with open(out) as f:
            m = re.search(r"dvara is ready; connect with: (\S+)", f.read())
        if m:
            return Dvara(proc, m.group(1), port, admin_port, err)
        if proc.poll() is not None:
            with open(err) as f:
                tail = f.read()[-2000:]
            procs.stop(proc)
            if admin_port is not None and "admin" in tail:
                print("note: dvara refused --admin-addr; counting messages client-side",
                      file=sys.stderr)
                args.no_admin = True
                return start_dvara(procs, backend, args)
            raise RuntimeError(f"dvara exited with {proc.returncode}:\n{tail}")
        time.sleep(0.05)
    procs.stop(proc)
    raise RuntimeError("dvara did not print its ready line in time")


# --------------------------------------------------------------------------- load workers

def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _worker_common() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pymongo_worker(uri: str, threads: int, duration: float, tag: str, start: Any,
                   results: Any) -> None:
    """Threads looping over ping, insert_one and find_one by _id, on one MongoClient."""
    _worker_common()
    try:
        import pymongo
        from bson import ObjectId
        client = pymongo.MongoClient(uri, maxPoolSize=max(threads, 1) + 2,
                                     serverSelectionTimeoutMS=10000, socketTimeoutMS=30000,
                                     connectTimeoutMS=10000)
        coll = client.bench[tag]
        admin = client.admin
        lock = threading.Lock()
        lats: list[array.array] = []
        totals = {"ops": 0, "errors": 0, "misses": 0, "first_error": None}
        warm = threading.Barrier(threads + 1)
        go = threading.Event()
        window: list[float] = []

        def run(tid: int) -> None:
            lat = array.array("d")
            ops = errors = misses = 0
            first_error = None
            last_id = None
            pad = "x" * 32

            def one(i: int) -> None:
                nonlocal last_id, misses
                k = i % 3
                if k == 0:
                    admin.command("ping")
                elif k == 1:
                    last_id = ObjectId()
                    coll.insert_one({"_id": last_id, "t": tid, "i": i, "pad": pad})
                else:
                    if coll.find_one({"_id": last_id}) is None:
                        misses += 1

            try:
                for i in range(WARMUP_OPS):
                    one(i)
            except Exception as exc:  # noqa: BLE001
                first_error = f"warm-up: {exc!r}"
            with contextlib.suppress(threading.BrokenBarrierError):
                warm.wait(120)
            go.wait(300)
            if not window:
                return
            deadline = window[0] + duration
            i = 0
            now = time.perf_counter()
            while now < deadline and i < 10_000_000:
                t = now
                try:
                    one(i)
                    ops += 1
                except Exception as exc:  # noqa: BLE001
                    errors += 1
                    if first_error is None:
                        first_error = repr(exc)[:300]
                now = time.perf_counter()
                lat.append(now - t)
                i += 1
            with lock:
                lats.append(lat)
                totals["ops"] += ops
                totals["errors"] += errors
                totals["misses"] += misses
                totals["first_error"] = totals["first_error"] or first_error

        ths = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
        for th in ths:
            th.start()
        warm.wait(120)
        results.put(("ready", os.getpid()))
        if start.wait(300):
            window.append(time.perf_counter())
        t0 = time.monotonic()
        go.set()
        for th in ths:
            th.join(duration + 60)
        t1 = time.monotonic()   # before close(): its endSessions is not part of the load
        client.close()
        allv = array.array("d")
        for a in lats:
            allv.extend(a)
        results.put(("done", {"ops": totals["ops"], "errors": totals["errors"],
                              "misses": totals["misses"], "first_error": totals["first_error"],
                              "t0": t0, "t1": t1, "lat": allv.tobytes()}))
    except Exception as exc:  # noqa: BLE001
        results.put(("fail", repr(exc)[:500]))


def raw_worker(addr: tuple[str, int], conns: int, duration: float, tag: str, start: Any,
               results: Any) -> None:
    """conns sockets, each sending pre-encoded pings one at a time, on one epoll loop."""
    _worker_common()
    try:
        socks: dict[int, socket.socket] = {}
        frames: dict[int, bytes] = {}
        rids: dict[int, int] = {}
        for i in range(conns):
            s = socket.create_connection(addr, timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rid = (os.getpid() * 1000 + i) & 0x7FFFFFFF
            frames[s.fileno()] = wire.op_msg({"ping": 1, "$db": "admin"}, req_id=rid)
            rids[s.fileno()] = rid
            socks[s.fileno()] = s
        first_error = None
        # Warm-up (blocking), checking the replies properly.
        for fd, s in socks.items():
            for _ in range(WARMUP_OPS):
                s.sendall(frames[fd])
                reply = wire.read_frame(s)
                doc = wire.reply_document(reply)
                if wire.response_to(reply) != rids[fd] or doc.get("ok") != 1:
                    first_error = first_error or f"warm-up reply {doc!r}"[:300]
        for s in socks.values():
            s.settimeout(None)
        ep = select.epoll()
        for fd in socks:
            ep.register(fd, select.EPOLLIN)
        results.put(("ready", os.getpid()))
        ok = start.wait(120)
        t0 = time.monotonic()
        lat = array.array("d")
        ops = errors = 0
        if ok:
            deadline = time.perf_counter() + duration
            hard_stop = deadline + 30
            sent_at: dict[int, float] = {}
            bufs: dict[int, bytes] = {}
            unpack = struct.Struct("<iii").unpack_from
            for fd, s in socks.items():
                sent_at[fd] = time.perf_counter()
                s.sendall(frames[fd])
            active = len(socks)
            while active and time.perf_counter() < hard_stop:
                for fd, _ in ep.poll(1.0):
                    s = socks[fd]
                    data = s.recv(262144)
                    if not data:
                        raise RuntimeError("server closed a connection")
                    if fd in bufs:
                        data = bufs.pop(fd) + data
                    if len(data) < 16 or unpack(data, 0)[0] > len(data):
                        bufs[fd] = data
                        continue
                    now = time.perf_counter()
                    length, _, resp_to = unpack(data, 0)
                    lat.append(now - sent_at[fd])
                    if length != len(data):
                        raise RuntimeError("unexpected extra bytes after a reply")
                    if resp_to != rids[fd] or b"errmsg" in data:
                        errors += 1
                        if first_error is None:
                            try:
                                first_error = repr(wire.reply_document(data))[:300]
                            except Exception:  # noqa: BLE001
                                first_error = f"reply answers {resp_to}, not {rids[fd]}"
                    else:
                        ops += 1
                    if now < deadline:
                        sent_at[fd] = time.perf_counter()
                        s.sendall(frames[fd])
                    else:
                        active -= 1
            if active:
                first_error = first_error or f"{active} connection(s) never answered"
        t1 = time.monotonic()
        ep.close()
        for s in socks.values():
            s.close()
        results.put(("done", {"ops": ops, "errors": errors, "misses": 0,
                              "first_error": first_error, "t0": t0, "t1": t1,
                              "lat": lat.tobytes()}))
    except Exception as exc:  # noqa: BLE001
        results.put(("fail", repr(exc)[:500]))


# --------------------------------------------------------------------------- one measurement

class Measurement(dict):
    pass


def run_load(workload: str, target: str, concurrency: int, duration: float, tag: str,
             backend: Backend, dvara: Optional[Dvara]) -> Measurement:
    """Start the load processes, run one measured window, collect everything."""
    ctx = mp.get_context("fork")
    nprocs = min(concurrency, MAX_LOAD_PROCS)
    start = ctx.Event()
    results = ctx.Queue()
    workers = []
    for i, n in enumerate(_split(concurrency, nprocs)):
        if workload == "pymongo":
            p = ctx.Process(target=pymongo_worker, args=(target, n, duration, tag, start, results),
                            daemon=True)
        else:
            host, port = target.rsplit(":", 1)
            p = ctx.Process(target=raw_worker, args=((host, int(port)), n, duration, tag, start,
                                                     results), daemon=True)
        workers.append(p)
    try:
        for p in workers:
            p.start()
        ready = 0
        fails = []
        deadline = time.monotonic() + 120
        while ready + len(fails) < nprocs:
            kind, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "ready":
                ready += 1
            elif kind == "fail":
                fails.append(payload)
        if fails:
            raise RuntimeError(f"load process failed before the window: {fails[0]}")
        sampler = ConnSampler(backend.port)
        before_counters = dvara.counters() if dvara else None
        sys0 = system_cpu()
        dvara_cpu0 = proc_cpu_split(dvara.proc.pid) if dvara else None
        backend_cpu0 = proc_cpu_seconds(backend.proc.pid)
        sampler.start()
        t_start = time.monotonic()
        start.set()
        done = []
        while len(done) + len(fails) < nprocs:
            kind, payload = results.get(timeout=duration + 120)
            if kind == "done":
                done.append(payload)
            elif kind == "fail":
                fails.append(payload)
        t_end = time.monotonic()
        dvara_cpu1 = proc_cpu_split(dvara.proc.pid) if dvara else None
        backend_cpu1 = proc_cpu_seconds(backend.proc.pid)
        sys1 = system_cpu()
        conns_max = sampler.stop()
        after_counters = dvara.counters() if dvara else None
        for p in workers:
            p.join(30)
    finally:
        for p in workers:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        with contextlib.suppress(Exception):
            results.close()
    if fails:
        raise RuntimeError(f"load process failed: {fails[0]}")
    lat = array.array("d")
    ops = errors = misses = 0
    first_error = None
    for d in done:
        lat.frombytes(d["lat"])
        ops += d["ops"]
        errors += d["errors"]
        misses += d["misses"]
        first_error = first_error or d["first_error"]
    window = max(max(d["t1"] for d in done) - min(d["t0"] for d in done), 1e-9)
    vals = sorted(lat)
    m = Measurement(
        ops=ops, errors=errors, misses=misses, first_error=first_error,
        window_s=round(window, 3), wall_s=round(t_end - t_start, 3),
        ops_per_s=ops / window,
        p50_ms=percentile(vals, 0.50) * 1000, p99_ms=percentile(vals, 0.99) * 1000,
        mean_ms=(sum(vals) / len(vals) * 1000) if vals else float("nan"),
        max_ms=vals[-1] * 1000 if vals else float("nan"),
        backend_conns_max=conns_max,
        machine_busy_pct=100.0 * (sys1[0] - sys0[0]) / max(sys1[1] - sys0[1], 1),
        backend_cpu_s=backend_cpu1 - backend_cpu0,
    )
    messages = ops + errors
    m["backend_cpu_us_per_op"] = m["backend_cpu_s"] / messages * 1e6 if messages else None
    if dvara is not None:
        m["dvara_utime_s"] = dvara_cpu1[0] - dvara_cpu0[0]
        m["dvara_stime_s"] = dvara_cpu1[1] - dvara_cpu0[1]
        m["dvara_cpu_s"] = m["dvara_utime_s"] + m["dvara_stime_s"]
        m["client_messages"] = messages
        counted = None
        if before_counters is not None and after_counters is not None:
            delta = {k: after_counters[k] - before_counters[k] for k in DVARA_COUNTERS}
            m["dvara_counters"] = delta
            counted = delta["requests"] or None
        m["dvara_messages"] = counted if counted is not None else messages
        m["dvara_messages_source"] = "dvara requests counter" if counted is not None else "client"
        m["dvara_cpu_us_per_msg"] = (m["dvara_cpu_s"] / m["dvara_messages"] * 1e6
                                     if m["dvara_messages"] else None)
    return m


def run_cell(workload: str, backend: Backend, concurrency: int, args: argparse.Namespace,
             procs: Procs, cell_no: int) -> dict[str, Any]:
    tag = f"c{cell_no}_{workload}_{concurrency}"
    if workload == "pymongo":
        direct_target = f"mongodb://127.0.0.1:{backend.port}/?replicaSet={backend.name}"
    else:
        direct_target = f"127.0.0.1:{backend.port}"
    direct = run_load(workload, direct_target, concurrency, args.duration, tag + "_d", backend,
                      None)
    time.sleep(0.3)   # let the direct connections close before counting proxied ones
    dvara = start_dvara(procs, backend, args)
    try:
        target = dvara.uri if workload == "pymongo" else f"127.0.0.1:{dvara.port}"
        proxied = run_load(workload, target, concurrency, args.duration, tag + "_p", backend,
                           dvara)
    finally:
        procs.stop(dvara.proc)
    with open(dvara.err, errors="replace") as f:
        log_lines = [line.rstrip() for line in f if line.strip()]
    proxied["dvara_log"] = log_lines[:50]
    proxied["dvara_log_lines"] = len(log_lines)
    return {"workload": workload, "backend": backend.name, "concurrency": concurrency,
            "direct": dict(direct), "proxied": dict(proxied)}


# --------------------------------------------------------------------------- report

def _f(v: Optional[float], fmt: str = "{:.0f}") -> str:
    if v is None or v != v:
        return "n/a"
    return fmt.format(v)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or a != a or b != b:
        return None
    return a / b


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| workload | backend | clients | direct ops/s | proxied ops/s | ops ratio | "
            "direct p50 / p99 ms | proxied p50 / p99 ms | p50 ratio | p99 ratio | "
            "dvara CPU µs/msg | backend conns max direct / proxied | errors direct / proxied |")
    sep = "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"
    lines = [head, sep]
    for r in rows:
        d, p = r["direct"], r["proxied"]
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r['concurrency']} "
            f"| {_f(d['ops_per_s'])} | {_f(p['ops_per_s'])} "
            f"| {_f(_ratio(p['ops_per_s'], d['ops_per_s']), '{:.2f}')} "
            f"| {_f(d['p50_ms'], '{:.2f}')} / {_f(d['p99_ms'], '{:.2f}')} "
            f"| {_f(p['p50_ms'], '{:.2f}')} / {_f(p['p99_ms'], '{:.2f}')} "
            f"| {_f(_ratio(p['p50_ms'], d['p50_ms']), '{:.2f}')} "
            f"| {_f(_ratio(p['p99_ms'], d['p99_ms']), '{:.2f}')} "
            f"| {_f(p.get('dvara_cpu_us_per_msg'))} "
            f"| {d['backend_conns_max']} / {p['backend_conns_max']} "
            f"| {d['errors'] + d['misses']} / {p['errors'] + p['misses']} |")
    return "\n".join(lines)


def detail_table(rows: list[dict[str, Any]]) -> str:
    head = ("| workload | backend | clients | CPU busy % before the cell | "
            "machine CPU busy % direct / proxied | "
            "backend CPU µs/op direct / proxied | dvara CPU s (user + sys) | "
            "msgs counted by dvara / by clients |")
    sep = "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"
    lines = [head, sep]
    for r in rows:
        d, p = r["direct"], r["proxied"]
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r['concurrency']} "
            f"| {_f(r.get('background_busy_pct'))} "
            f"| {_f(d['machine_busy_pct'])} / {_f(p['machine_busy_pct'])} "
            f"| {_f(d['backend_cpu_us_per_op'])} / {_f(p['backend_cpu_us_per_op'])} "
            f"| {_f(p.get('dvara_cpu_s'), '{:.2f}')} ({_f(p.get('dvara_utime_s'), '{:.2f}')} + "
            f"{_f(p.get('dvara_stime_s'), '{:.2f}')}) "
            f"| {_f(p.get('dvara_messages'))} / {p.get('client_messages')} |")
    return "\n".join(lines)


def anomalies(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        cell = f"{r['workload']}/{r['backend']}/{r['concurrency']}"
        for side in ("direct", "proxied"):
            m = r[side]
            if m["errors"] or m["misses"]:
                notes.append(f"{cell} {side}: {m['errors']} errors, {m['misses']} finds that "
                             f"missed a just-inserted document; first: {m['first_error']}")
            elif m["first_error"]:
                notes.append(f"{cell} {side}: {m['first_error']}")
        p = r["proxied"]
        c = p.get("dvara_counters") or {}
        bad = {k: v for k, v in c.items()
               if k.startswith("errors") or k in ("server_checkout_timeouts", "clients_rejected")}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            notes.append(f"{cell}: dvara counters during the window: {bad}")
        if p.get("dvara_log_lines"):
            notes.append(f"{cell}: dvara logged {p['dvara_log_lines']} warning/error line(s), "
                         f"first: {p['dvara_log'][0]}")
        if c and p.get("client_messages") is not None:
            extra = c.get("requests", 0) - p["client_messages"]
            if r["workload"] == "raw" and extra:
                notes.append(f"{cell}: dvara counted {c.get('requests', 0):.0f} requests for "
                             f"{p['client_messages']} client pings")
    return notes


def report(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    busy = machine.get("busy_pct_before", 0)
    noisy = " (a shared, busy machine: expect noise)" if busy > 20 else ""
    out = ["## dvara benchmark", ""]
    out.append(f"Machine: {machine['nproc']} CPU(s), {machine['cpu_model']}; "
               f"{machine['implementation']} {machine['python']}, pymongo {machine['pymongo']}, "
               f"Linux {machine['kernel']}; {machine['date']}; load average at start "
               f"{machine['loadavg_at_start']}, CPU busy before the run "
               f"{busy:.0f}%{noisy}. dvara: {machine.get('dvara_source', 'unknown')}.")
    out.append("")
    out.append(f"Settings: {args.duration:g} s per cell and side; concurrency "
               f"{','.join(map(str, args.concurrency))}; dvara --max-connections "
               f"{args.max_connections}, --workers {args.dvara_workers or 'default (32)'}; "
               f"load from min(clients, {MAX_LOAD_PROCS}) processes; one fresh dvara per cell; "
               f"each cell waited up to {args.quiet_wait:g} s for the CPU to be under "
               f"{args.quiet_threshold:g}% busy.")
    out.append("")
    out.append(table(rows))
    out.append("")
    out.append("Ratios are proxied / direct. dvara CPU is utime+stime of the dvara process over "
               "the window divided by the messages it handled (its own `requests` counter, which "
               "for pymongo also counts the hellos dvara answers itself). Backend connections are "
               "the most established connections to the backend port seen by `ss` during the "
               "window (direct pymongo: each load process's MongoClient pool plus its 2 monitoring "
               "connections; proxied: dvara's pool plus its own monitoring connection). "
               "Errors include finds that missed a just-inserted document.")
    out.append("")
    out.append(detail_table(rows))
    notes = anomalies(rows)
    out.append("")
    out.append("Anomalies: " + ("none seen (no client errors, no dvara error counters, "
                                "no dvara warnings)." if not notes else ""))
    for n in notes:
        out.append(f"- {n}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per cell and side (3)")
    ap.add_argument("--concurrency", default="1,16,64",
                    help="comma-separated client counts (1,16,64)")
    ap.add_argument("--workloads", default="pymongo,raw",
                    help="comma-separated: pymongo, raw (both)")
    ap.add_argument("--backends", default="secantus,canned",
                    help="backends for the raw workload: secantus, canned (both); "
                         "pymongo always uses secantus")
    ap.add_argument("--dvara-workers", type=int, default=None,
                    help="dvara --workers (dvara's default)")
    ap.add_argument("--max-connections", type=int, default=8, help="dvara --max-connections (8)")
    ap.add_argument("--dvara-ref", metavar="COMMIT",
                    help="benchmark dvara as of this git commit (default: the working tree, "
                         "copied at start)")
    ap.add_argument("--no-admin", action="store_true",
                    help="do not start dvara's admin endpoint; count messages client-side")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each cell, wait up to this many seconds for the machine to be "
                         "less than --quiet-threshold %% busy (20; 0: measure once, do not wait)")
    ap.add_argument("--quiet-threshold", type=float, default=25.0,
                    help="CPU busy %% counted as quiet (25)")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--keep-logs", action="store_true", help="keep the subprocess logs")
    args = ap.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error("--concurrency: comma-separated integers")
    if not args.concurrency or min(args.concurrency) < 1 or max(args.concurrency) > 1024:
        ap.error("--concurrency: values 1-1024")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"pymongo", "raw"}:
        ap.error("--workloads: pymongo and/or raw")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - {"secantus", "canned"}:
        ap.error("--backends: secantus and/or canned")
    if not 0 <= args.quiet_wait <= 3600:
        ap.error("--quiet-wait: 0-3600 seconds")
    if not 0.2 <= args.duration <= 600:
        ap.error("--duration: 0.2-600 seconds")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    machine["busy_pct_before"] = round(background_busy(), 1)
    logdir = tempfile.mkdtemp(prefix="dvara-bench-")
    procs = Procs(logdir)
    rows: list[dict[str, Any]] = []
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        machine["dvara_source"] = dvara_source_info(args.dvara_ref)
        args.dvara_script = snapshot_dvara(os.path.join(logdir, "dvara-src"), args.dvara_ref)
        backends: dict[str, Backend] = {}
        need_secantus = "pymongo" in args.workloads or "secantus" in args.backends
        if need_secantus:
            backends["secantus"] = start_secantus(procs)
        if "raw" in args.workloads and "canned" in args.backends:
            backends["canned"] = start_canned(procs)
        plan = []
        for workload in args.workloads:
            names = ["secantus"] if workload == "pymongo" else [
                b for b in ("secantus", "canned") if b in args.backends]
            for name in names:
                for c in args.concurrency:
                    plan.append((workload, name, c))
        for n, (workload, name, c) in enumerate(plan, 1):
            print(f"[{n}/{len(plan)}] {workload} on {name}, {c} client(s) ...", file=sys.stderr,
                  flush=True)
            for b in backends.values():
                if b.proc.poll() is not None:
                    raise RuntimeError(f"backend {b.name} exited with {b.proc.returncode}")
            background = wait_quiet(args.quiet_wait, args.quiet_threshold)
            row = run_cell(workload, backends[name], c, args, procs, n)
            row["background_busy_pct"] = round(background, 1)
            rows.append(row)
            d, p = row["direct"], row["proxied"]
            print(f"    direct {d['ops_per_s']:.0f} ops/s p50 {d['p50_ms']:.2f} ms; proxied "
                  f"{p['ops_per_s']:.0f} ops/s p50 {p['p50_ms']:.2f} ms; dvara "
                  f"{_f(p.get('dvara_cpu_us_per_msg'))} µs/msg", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001
        print(f"bench failed: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        if not args.keep_logs and status == 0:
            shutil.rmtree(logdir, ignore_errors=True)
        elif status:
            print(f"subprocess logs kept in {logdir}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": {k: v for k, v in vars(args).items()},
                       "rows": rows, "complete": status == 0}, f, indent=2, default=str)
    if rows:
        print(report(rows, machine, args), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
