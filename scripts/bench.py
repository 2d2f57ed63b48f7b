#!/usr/bin/env python3
"""Benchmark dvara beside haproxy, a bare Python relay and no proxy at all, interleaved.

    python scripts/bench.py [--rounds 3] [--duration 4] [--workloads raw,pymongo]
                            [--raw-clients 1x1,2x16] [--pymongo-clients 2x8]
                            [--paths direct,haproxy,floor,dvara]
                            [--dvara-variant NAME=ARGS ...] [--dvara-ref COMMIT]
                            [--floor-relay FILE] [--haproxy EXE]
                            [--quiet-wait 20] [--quiet-threshold 25]
                            [--max-others 15] [--max-stolen 5] [--retries 2] [--json FILE]
    python scripts/bench.py idle --help     # the idle-clients scenario (scripts/bench_idle.py)

Every path ends at one canned backend (scripts/canned_backend.c, built with cc -O2 at start;
scripts/canned_backend.py if there is no compiler), which answers a ping in microseconds,
so a proxy's cost is what shows:

- direct: clients talk to the backend;
- haproxy: Debian's haproxy in TCP mode (`haproxy -f FILE -db`, its default thread count);
- floor: --floor-relay (default ../shared/tools/floor_relay.py beside the repository), a
  thread-per-client CPython relay with nothing else: the floor of a Python proxy. Left out,
  with a note, when the file is missing (so is haproxy when it is not installed);
- one column per --dvara-variant NAME=ARGS: dvara with those extra arguments (default one
  variant, `dvara=`), e.g. --dvara-variant 'p1=' --dvara-variant 'p2=--processes 2'.

Workloads, each a set of "PROCSxN" scenarios (load processes x clients in each):
- raw (1x1 and 2x16): pre-encoded OP_MSG {ping: 1} frames, one in flight per socket, one
  epoll loop per load process; costs the client little, so it shows the proxy's ceiling.
- pymongo (2x8): 8 threads per process loop over admin.command("ping") on one
  MongoClient. Every path, dvara included, is reached with directConnection=true and
  serverMonitoringMode=poll: a replica-set URI would make the driver go to the member
  the hello names (the backend itself for haproxy and the floor relay), and the
  streaming monitor would spin against the canned backend, which answers an awaitable
  hello at once, burning CPU in the client and in every proxy on the way. dvara's own URI
  names the same single port, so the driver sends the same messages on every path.

Interleaving: each proxy is started once for the whole run. In each of --rounds rounds,
for each scenario, the benchmark waits (at most --quiet-wait s) for the machine to be
quiet, prints the background load, then runs every path once, in order, for --duration s.
The machine is assumed shared: a window during which processes the benchmark did not start
used more than --max-others % of the machine, or during which the hypervisor stole more
than --max-stolen % of its time (a VM's CPUs given to other guests: everything runs slower
and CPU times swell), is run again (at most --retries times, after another quiet wait);
the least disturbed attempt is kept and the table shows both shares.
The table gives, per path, the median over rounds of msg/s, of the proxy's CPU per
message and of p50/p99 latency, and ratios to haproxy's medians. Proxy CPU per message is
the utime+stime (plus that of reaped children) of the proxy's whole process tree over the
window (see benchkit.tree_cpu), divided by the replies the clients counted.

dvara runs from a copy of dvara.py and dvara_lib/ taken at start (the working tree, or
--dvara-ref). Everything listens on and connects to loopback only and is stopped at exit,
also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from importlib import metadata
from typing import Any, Optional

import benchkit as kit

WARMUP = 20          # messages per connection/thread before the window
READY_TIMEOUT = 120.0


# --------------------------------------------------------------------------- load workers

def _worker_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raw_connect(port: int, conns: int) -> tuple[list[socket.socket], list[bytes], list[int]]:
    """conns connected sockets, each with its ping frame, warmed up and checked."""
    socks, frames, rids = [], [], []
    for i in range(conns):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rid = (os.getpid() * 1000 + i) & 0x7FFFFFFF
        frame = kit.op_msg({"ping": 1, "$db": "admin"}, rid)
        for _ in range(WARMUP):
            s.sendall(frame)
            reply = kit.read_frame(s)
            if struct.unpack_from("<i", reply, 8)[0] != rid or kit.reply_doc(reply).get("ok") != 1:
                raise RuntimeError(f"bad warm-up reply {kit.reply_doc(reply)!r}"[:300])
        s.settimeout(None)
        socks.append(s)
        frames.append(frame)
        rids.append(rid)
    return socks, frames, rids


def _raw_loop(socks: list[socket.socket], frames: list[bytes], rids: list[int],
              duration: float) -> dict[str, Any]:
    """Ping on every socket, one frame in flight each, until duration has passed."""
    ep = select.epoll()
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    unpack = struct.Struct("<iii").unpack_from
    lat, ops, errors, first_error = array.array("d"), 0, 0, None
    bufs: dict[int, bytes] = {}
    sent_at = [time.perf_counter()] * len(socks)
    deadline = sent_at[0] + duration
    for s, frame in zip(socks, frames):
        s.sendall(frame)
    active = len(socks)
    while active and time.perf_counter() < deadline + 30:
        for fd, _ in ep.poll(1.0):
            i = by_fd[fd]
            chunk = socks[i].recv(262144)
            if not chunk:
                raise RuntimeError("the server closed a connection")
            data = bufs.pop(fd, b"") + chunk
            if len(data) < 16 or unpack(data, 0)[0] > len(data):
                bufs[fd] = data   # a partial reply
                continue
            now = time.perf_counter()
            lat.append(now - sent_at[i])
            if unpack(data, 0)[2] != rids[i] or b"errmsg" in data:
                errors += 1
                first_error = first_error or repr(data[:200])
            else:
                ops += 1
            if now < deadline:
                sent_at[i] = time.perf_counter()
                socks[i].sendall(frames[i])
            else:
                active -= 1
    ep.close()
    if active:
        first_error = first_error or f"{active} connection(s) never answered"
    return {"ops": ops, "errors": errors, "first_error": first_error, "lat": lat}


def raw_worker(port: int, conns: int, duration: float, start: Any, results: Any) -> None:
    _worker_setup()
    try:
        socks, frames, rids = _raw_connect(port, conns)
        results.put(("ready", None))
        if not start.wait(READY_TIMEOUT):
            raise RuntimeError("never started")
        t0 = time.monotonic()
        out = _raw_loop(socks, frames, rids, duration)
        out.update(t0=t0, t1=time.monotonic(), lat=out["lat"].tobytes())
        results.put(("done", out))   # before closing: the close is not part of the window
        for s in socks:
            s.close()
    except Exception as exc:  # noqa: BLE001
        results.put(("fail", repr(exc)[:500]))


def _ping_thread(admin: Any, duration: float, warm: threading.Barrier, go: threading.Event,
                 window: list[float], out: list[dict[str, Any]]) -> None:
    lat, ops, errors, first_error = array.array("d"), 0, 0, None
    with contextlib.suppress(Exception):
        for _ in range(WARMUP):
            admin.command("ping")
    with contextlib.suppress(threading.BrokenBarrierError):
        warm.wait(READY_TIMEOUT)
    if go.wait(READY_TIMEOUT + 60) and window:
        deadline, now, i = window[0] + duration, time.perf_counter(), 0
        while now < deadline and i < 10_000_000:
            t = now
            try:
                admin.command("ping")
                ops += 1
            except Exception as exc:  # noqa: BLE001
                errors += 1
                first_error = first_error or repr(exc)[:300]
            now = time.perf_counter()
            lat.append(now - t)
            i += 1
    out.append({"ops": ops, "errors": errors, "first_error": first_error, "lat": lat})


def pymongo_worker(uri: str, threads: int, duration: float, start: Any, results: Any) -> None:
    """threads threads looping over ping on one MongoClient."""
    _worker_setup()
    try:
        import pymongo
        client = pymongo.MongoClient(uri, maxPoolSize=threads, serverSelectionTimeoutMS=10000,
                                     socketTimeoutMS=30000, connectTimeoutMS=10000)
        warm, go = threading.Barrier(threads + 1), threading.Event()
        window: list[float] = []
        outs: list[dict[str, Any]] = []
        ths = [threading.Thread(target=_ping_thread, daemon=True,
                                args=(client.admin, duration, warm, go, window, outs))
               for _ in range(threads)]
        for th in ths:
            th.start()
        warm.wait(READY_TIMEOUT)
        results.put(("ready", None))
        if start.wait(READY_TIMEOUT):
            window.append(time.perf_counter())
        t0 = time.monotonic()
        go.set()
        for th in ths:
            th.join(duration + 60)
        lat = array.array("d")
        for o in outs:
            lat.extend(o["lat"])
        results.put(("done", {"ops": sum(o["ops"] for o in outs), "t0": t0,
                              "errors": sum(o["errors"] for o in outs), "t1": time.monotonic(),
                              "first_error": next((o["first_error"] for o in outs
                                                   if o["first_error"]), None),
                              "lat": lat.tobytes()}))
        client.close()
    except Exception as exc:  # noqa: BLE001
        results.put(("fail", repr(exc)[:500]))


# --------------------------------------------------------------------------- one window

class Scenario:
    """One workload at one client count: procs load processes of per_proc clients each."""

    def __init__(self, workload: str, procs: int, per_proc: int) -> None:
        self.workload, self.procs, self.per_proc = workload, procs, per_proc
        total = procs * per_proc
        unit = "threads" if workload == "pymongo" else "sockets"
        self.label = str(total) if procs == 1 else f"{total} ({procs}×{per_proc} {unit})"


def pymongo_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true&serverMonitoringMode=poll"


def _collect(results: Any, kind: str, n: int, timeout: float) -> list[Any]:
    """n messages of kind from the load processes; raises on a failure or a time-out."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"load processes: {len(got)} of {n} {kind!r} in {timeout:.0f}s")
        try:
            k, payload = results.get(timeout=min(left, 5.0))
        except Exception:  # noqa: BLE001  (queue.Empty)
            continue
        if k == "fail":
            raise RuntimeError(f"a load process failed: {payload}")
        got.append(payload)
    return got


def _reap(workers: list[Any], wait: float) -> None:
    """Join the load processes (each gets up to wait s), then terminate, then kill."""
    for p in workers:
        p.join(wait)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_window(sc: Scenario, target: kit.Target, backend: kit.Target,
               duration: float) -> dict[str, Any]:
    """Start the load processes, warm them up, measure one window, collect everything."""
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    if sc.workload == "pymongo":
        fn, dest = pymongo_worker, pymongo_uri(target.port)
    else:
        fn, dest = raw_worker, target.port
    workers = [ctx.Process(target=fn, args=(dest, sc.per_proc, duration, start, results),
                           daemon=True) for _ in range(sc.procs)]
    try:
        for p in workers:
            p.start()
        _collect(results, "ready", sc.procs, READY_TIMEOUT)
        before = (kit.cpu_table(), kit.system_cpu())
        start.set()
        done = _collect(results, "done", sc.procs, duration + READY_TIMEOUT)
        after = (kit.cpu_table(), kit.system_cpu())
        _reap(workers, 10.0)
    finally:
        _reap(workers, 0.0)   # after an error or Ctrl-C: at once
        with contextlib.suppress(Exception):
            results.close()
    return _measure(done, before, after, target, backend)


def _measure(done: list[dict[str, Any]], before: tuple, after: tuple,
             target: kit.Target, backend: kit.Target) -> dict[str, Any]:
    lat = array.array("d")
    for d in done:
        lat.frombytes(d["lat"])
    vals = sorted(lat)
    ops, errors = sum(d["ops"] for d in done), sum(d["errors"] for d in done)
    window = max(max(d["t1"] for d in done) - min(d["t0"] for d in done), 1e-9)
    messages = ops + errors
    proxy_cpu = _delta(target, before, after) if target.proc else None
    backend_cpu = _delta(backend, before, after)
    return {
        "ops": ops, "errors": errors, "window_s": round(window, 3),
        "first_error": next((d["first_error"] for d in done if d["first_error"]), None),
        "msgs_per_s": ops / window, "p50_ms": percentile(vals, 0.50) * 1e3,
        "p99_ms": percentile(vals, 0.99) * 1e3, "max_ms": vals[-1] * 1e3 if vals else None,
        "proxy_cpu_s": proxy_cpu,
        "proxy_cpu_us_per_msg": proxy_cpu / messages * 1e6 if proxy_cpu is not None
        and messages else None,
        "backend_cpu_us_per_msg": backend_cpu / messages * 1e6 if messages else None,
        **_busy(before, after),
    }


def _delta(t: kit.Target, before: tuple, after: tuple) -> float:
    return kit.tree_cpu(t.proc.pid, after[0]) - kit.tree_cpu(t.proc.pid, before[0])


def _busy(before: tuple, after: tuple) -> dict[str, float]:
    """The machine's busy % over the window, and the share used by user-space processes
    the benchmark did not start (its own tree: load processes, proxies, backend)."""
    total = max(after[1][1] - before[1][1], 1)   # jiffies, all CPUs
    me = os.getpid()
    others = kit.others_cpu(me, after[0]) - kit.others_cpu(me, before[0])
    return {"machine_busy_pct": round(100.0 * (after[1][0] - before[1][0]) / total, 1),
            "others_busy_pct": round(max(0.0, 100.0 * others * kit.CLK_TCK / total), 1),
            "stolen_pct": round(100.0 * (after[1][2] - before[1][2]) / total, 1)}


def _noise(m: dict[str, Any]) -> float:
    """How much others disturbed a window: their CPU share plus the hypervisor's steal."""
    return m["others_busy_pct"] + m["stolen_pct"]


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, max(0, int(q * len(sorted_vals))))]


# --------------------------------------------------------------------------- the rounds

def run_rounds(args: argparse.Namespace, scenarios: list[Scenario], targets: list[kit.Target],
               backend: kit.Target) -> list[dict[str, Any]]:
    """Every scenario, every round, every path once in order; one record per window."""
    windows = []
    for rnd in range(1, args.rounds + 1):
        for sc in scenarios:
            busy, waited = kit.wait_quiet(args.quiet_wait, args.quiet_threshold)
            log(f"round {rnd}/{args.rounds}, {sc.workload} {sc.label}: background load "
                f"{busy:.0f}% (waited {waited:.0f} s)")
            for t in targets:
                m = measure(args, sc, t, backend, [backend] + targets)
                m.update(round=rnd, workload=sc.workload, clients=sc.label, path=t.name,
                         kind=t.kind, background_busy_pct=round(busy, 1))
                windows.append(m)
    return windows


def measure(args: argparse.Namespace, sc: Scenario, t: kit.Target, backend: kit.Target,
            everyone: list[kit.Target]) -> dict[str, Any]:
    """One window for one path; run again (at most --retries times, after a quiet wait) when
    other processes used more than --max-others % of the machine during it, or the
    hypervisor stole more than --max-stolen %. Keeps the least disturbed attempt."""
    attempts: list[dict[str, Any]] = []
    for attempt in range(args.retries + 1):
        check_alive(everyone)
        m = run_window(sc, t, backend, args.duration)
        attempts.append(m)
        log(f"    {t.name:>8}: {m['msgs_per_s']:9.0f} msg/s, proxy CPU "
            f"{fmt(m['proxy_cpu_us_per_msg'], '{:.1f}')} µs/msg, p50 {m['p50_ms']:.3f} ms, "
            f"errors {m['errors']}, others' CPU {m['others_busy_pct']:.0f}%, stolen "
            f"{m['stolen_pct']:.0f}%")
        if (m["others_busy_pct"] <= args.max_others and m["stolen_pct"] <= args.max_stolen) \
                or attempt == args.retries:
            break
        busy, waited = kit.wait_quiet(args.quiet_wait, args.quiet_threshold)
        log(f"    (disturbed; again after waiting {waited:.0f} s, background {busy:.0f}%)")
    best = min(attempts, key=_noise)
    best["discarded"] = [{k: a[k] for k in ("msgs_per_s", "proxy_cpu_us_per_msg",
                                            "others_busy_pct", "stolen_pct")}
                         for a in attempts if a is not best]
    return best


def check_alive(targets: list[kit.Target]) -> None:
    for t in targets:
        if t.proc is not None and t.proc.poll() is not None:
            raise RuntimeError(f"{t.name} exited with {t.proc.returncode}:\n{kit.log_tail(t.proc)}")


def _median(ws: list[dict[str, Any]], key: str) -> Optional[float]:
    vals = [w[key] for w in ws if w.get(key) is not None and w[key] == w[key]]
    return statistics.median(vals) if vals else None


def summarize(windows: list[dict[str, Any]], scenarios: list[Scenario]) -> list[dict[str, Any]]:
    """One row per scenario x path: medians over rounds, and ratios to haproxy's medians."""
    rows = []
    paths = list(dict.fromkeys(w["path"] for w in windows))   # in run order
    for sc in scenarios:
        cell = [w for w in windows if w["workload"] == sc.workload and w["clients"] == sc.label]
        base = [w for w in cell if w["kind"] == "haproxy"]
        for path in paths:
            ws = [w for w in cell if w["path"] == path]
            if not ws:
                continue
            row = {"workload": sc.workload, "clients": sc.label, "path": path,
                   "rounds": len(ws), "errors": sum(w["errors"] for w in ws),
                   "others_busy_pct_max": max(w["others_busy_pct"] for w in ws),
                   "stolen_pct_max": max(w["stolen_pct"] for w in ws),
                   "retried": sum(len(w["discarded"]) for w in ws),
                   "msgs_per_s_min": min(w["msgs_per_s"] for w in ws),
                   "msgs_per_s_max": max(w["msgs_per_s"] for w in ws)}
            for key in ("msgs_per_s", "proxy_cpu_us_per_msg", "p50_ms", "p99_ms",
                        "backend_cpu_us_per_msg", "others_busy_pct", "stolen_pct"):
                row[key] = _median(ws, key)
            row["msgs_ratio_haproxy"] = ratio(row["msgs_per_s"], _median(base, "msgs_per_s"))
            row["cpu_ratio_haproxy"] = ratio(row["proxy_cpu_us_per_msg"],
                                             _median(base, "proxy_cpu_us_per_msg"))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- report

def fmt(v: Optional[float], pattern: str = "{:,.0f}") -> str:
    return "n/a" if v is None or v != v else pattern.format(v)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | clients | path | msg/s | msg/s min–max | msg/s × haproxy | "
             "proxy CPU µs/msg | CPU × haproxy | p50 ms | p99 ms | others' CPU % | stolen % |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['clients']} | {r['path']} | {fmt(r['msgs_per_s'])} "
            f"| {fmt(r['msgs_per_s_min'])}–{fmt(r['msgs_per_s_max'])} "
            f"| {fmt(r['msgs_ratio_haproxy'], '{:.2f}')} "
            f"| {fmt(r['proxy_cpu_us_per_msg'], '{:.1f}')} "
            f"| {fmt(r['cpu_ratio_haproxy'], '{:.1f}')} "
            f"| {fmt(r['p50_ms'], '{:.3f}')} | {fmt(r['p99_ms'], '{:.3f}')} "
            f"| {fmt(r['others_busy_pct'])} (≤{fmt(r['others_busy_pct_max'])}) "
            f"| {fmt(r['stolen_pct'])} (≤{fmt(r['stolen_pct_max'])}) |")
    return "\n".join(lines)


def header(run: dict[str, Any]) -> str:
    m = run["machine"]
    paths = ", ".join(f"{name} ({desc})" for name, desc in run["paths"].items())
    return (f"## dvara benchmark, {m['date']}\n\n"
            f"Machine: {m['hostname']}, {m['nproc']} CPU(s) {m['cpu_model']}, Linux "
            f"{m['kernel']}, {m['implementation']} {m['python']}, pymongo {run['pymongo']}, "
            f"haproxy {run['haproxy']}; load average at start {m['loadavg_at_start']}.  \n"
            f"dvara measured: {run['source']['source']}; git describe "
            f"{run['source']['describe']}.  \n"
            f"Command: `{run['command']}`; {run['rounds']} rounds × {run['duration']:g} s per "
            f"path, interleaved, medians over rounds. Backend: {run['backend']}.  \n"
            f"Paths: {paths}.")


NOTES = ("msg/s: replies per second counted by the clients. Proxy CPU: utime+stime of the "
         "proxy's whole process tree over the window (children included), divided by the "
         "messages the clients counted; n/a for direct (no proxy). × haproxy: this path's "
         "median over haproxy's. p50/p99: per-message round trip seen by the clients. "
         "Others' CPU: the share of the machine used during the window by user processes the "
         "benchmark did not start (median, and the most in any kept window); a window where "
         "it passed --max-others % was run again, at most --retries times, keeping the "
         "quietest attempt. Stolen: the share of the machine's time the hypervisor gave to "
         "other guests while this one had work (median, and the most); a window above "
         "--max-stolen % was run again in the same way.")


def anomalies(windows: list[dict[str, Any]], targets: list[kit.Target]) -> list[str]:
    notes = [f"round {w['round']} {w['workload']} {w['clients']} {w['path']}: {w['errors']} "
             f"error(s), first: {w['first_error']}" for w in windows if w["first_error"]]
    for t in targets:
        if t.kind == "dvara" and t.proc is not None:
            lines = [ln for ln in kit.log_tail(t.proc, 4000).splitlines() if ln.strip()]
            if lines:
                notes.append(f"dvara {t.name} logged: {lines[0][:200]} (and {len(lines) - 1} "
                             "more line(s))")
    return notes


def report(run: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    out = [header(run), "", table(rows), "", NOTES, ""]
    out.append("Background load before each round (busy %): " + ", ".join(
        f"r{r} {w}: {b:.0f}" for r, w, b in run["background"]))
    out.append("")
    out.append("Anomalies: " + ("none (no client errors, no dvara log lines)." if not notes
                                else ""))
    out.extend(f"- {n}" for n in notes)
    return "\n".join(out)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main

def _scenarios(text: str, workload: str, ap: argparse.ArgumentParser) -> list[Scenario]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            procs, per = (int(v) for v in item.lower().split("x"))
        except ValueError:
            ap.error(f"{item!r}: expected PROCSxN, e.g. 2x16")
        if not (1 <= procs <= 8 and 1 <= per <= 512):
            ap.error(f"{item!r}: 1-8 processes of 1-512 clients")
        out.append(Scenario(workload, procs, per))
    return out


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds (3); medians over rounds")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per path (4)")
    ap.add_argument("--workloads", default="raw,pymongo", help="raw and/or pymongo (both)")
    ap.add_argument("--raw-clients", default="1x1,2x16", help="PROCSxN scenarios (1x1,2x16)")
    ap.add_argument("--pymongo-clients", default="2x8", help="PROCSxTHREADS scenarios (2x8)")
    ap.add_argument("--paths", default="direct,haproxy,floor,dvara",
                    help="which paths, in this order (direct,haproxy,floor,dvara)")
    ap.add_argument("--dvara-variant", action="append", metavar="NAME=ARGS",
                    help="a dvara column with extra dvara arguments (repeatable; "
                         "default: 'dvara=')")
    ap.add_argument("--dvara-ref", metavar="COMMIT",
                    help="measure dvara as of this commit (default: the working tree)")
    ap.add_argument("--floor-relay", default=kit.DEFAULT_FLOOR, metavar="FILE",
                    help=f"the floor relay script ({kit.DEFAULT_FLOOR})")
    ap.add_argument("--haproxy", default="haproxy", metavar="EXE", help="haproxy (haproxy)")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each round, wait up to this many s for a quiet machine (20)")
    ap.add_argument("--quiet-threshold", type=float, default=25.0,
                    help="CPU busy %% counted as quiet (25)")
    ap.add_argument("--max-others", type=float, default=15.0,
                    help="run a window again when other processes used more than this %% of "
                         "the machine during it (15)")
    ap.add_argument("--max-stolen", type=float, default=5.0,
                    help="run a window again when the hypervisor stole more than this %% of "
                         "the machine's time during it (5)")
    ap.add_argument("--retries", type=int, default=2,
                    help="at most this many extra runs of a noisy window (2)")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--keep-logs", action="store_true", help="keep the subprocess logs")
    args = ap.parse_args(argv)
    _check_args(args, ap)
    return args


def _check_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    if not 1 <= args.rounds <= 50 or not 0.5 <= args.duration <= 600:
        ap.error("--rounds 1-50, --duration 0.5-600")
    if not 0 <= args.quiet_wait <= 3600 or not 0 <= args.retries <= 10:
        ap.error("--quiet-wait: 0-3600 s, --retries 0-10")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - {"raw", "pymongo"}:
        ap.error("--workloads: raw and/or pymongo")
    args.scenarios = [sc for w in workloads for sc in
                      _scenarios(getattr(args, f"{w}_clients"), w, ap)]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not args.paths or set(args.paths) - {"direct", "haproxy", "floor", "dvara"}:
        ap.error("--paths: some of direct, haproxy, floor, dvara")
    try:
        args.variants = [kit.parse_variant(v) for v in args.dvara_variant or ["dvara="]]
    except ValueError as exc:
        ap.error(str(exc))
    names = [n for n, _ in args.variants]
    if len(set(names)) != len(names) or set(names) & {"direct", "haproxy", "floor"}:
        ap.error("--dvara-variant: names must be unique and not direct/haproxy/floor")


def start_targets(args: argparse.Namespace, procs: kit.Procs, backend: kit.Target,
                  workdir: str, run: dict[str, Any]) -> list[kit.Target]:
    """Every path's proxy, started once for the whole run, in --paths order."""
    targets, paths = [], run["paths"]
    for path in args.paths:
        if path == "direct":
            targets.append(kit.Target("direct", "direct", backend.port, None))
            paths["direct"] = "no proxy"
        elif path == "haproxy" and run["haproxy"] == "absent":
            log(f"note: {args.haproxy} not found; no haproxy column (and no × haproxy ratios)")
        elif path == "haproxy":
            targets.append(kit.start_haproxy(procs, backend, workdir, args.haproxy))
            paths["haproxy"] = "TCP mode"
        elif path == "floor" and not os.path.isfile(args.floor_relay):
            log(f"note: {args.floor_relay} not found; no floor column")
        elif path == "floor":
            targets.append(kit.start_floor(procs, backend, args.floor_relay))
            paths["floor"] = os.path.basename(args.floor_relay)
        elif path == "dvara":
            for name, extra in args.variants:
                targets.append(kit.start_dvara(procs, args.dvara_script, backend, name, extra))
                paths[name] = "dvara " + (" ".join(extra) or "defaults")
    return targets


def describe_run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    try:
        pymongo_version = metadata.version("pymongo")
    except metadata.PackageNotFoundError:
        pymongo_version = "absent"
    return {"machine": kit.machine_info(), "source": kit.source_info(args.dvara_ref),
            "pymongo": pymongo_version, "haproxy": kit.tool_version([args.haproxy, "-v"]),
            "command": " ".join(["python scripts/bench.py", *argv]), "rounds": args.rounds,
            "duration": args.duration, "paths": {}, "background": []}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["idle"]:
        import bench_idle
        return bench_idle.main(argv[1:])
    args = parse_args(argv)
    run = describe_run(args, argv)
    workdir, procs = kit.make_workdir(), None
    windows: list[dict[str, Any]] = []
    notes: list[str] = []
    old_term, status = kit.on_sigterm_raise(), 0
    try:
        procs = kit.Procs(workdir)
        args.dvara_script = kit.snapshot_dvara(os.path.join(workdir, "dvara-src"), args.dvara_ref)
        backend, run["backend"] = kit.start_backend(procs, workdir)
        targets = start_targets(args, procs, backend, workdir, run)
        windows = run_rounds(args, args.scenarios, targets, backend)
        notes = anomalies(windows, targets)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        status = 130
    except Exception as exc:  # noqa: BLE001
        log(f"bench failed: {exc}")
        status = 1
    finally:
        if procs is not None:
            procs.stop_all()
        signal.signal(signal.SIGTERM, old_term)
    return finish(args, run, windows, notes, status, workdir)


def finish(args: argparse.Namespace, run: dict[str, Any], windows: list[dict[str, Any]],
           notes: list[str], status: int, workdir: str) -> int:
    run["background"] = list(dict.fromkeys((w["round"], f"{w['workload']} {w['clients']}",
                                            w["background_busy_pct"]) for w in windows))
    rows = summarize(windows, args.scenarios)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": run, "complete": status == 0, "summary": rows,
                       "windows": windows, "notes": notes}, f, indent=1, default=str)
    if rows:
        print(report(run, rows, notes), flush=True)
    if args.keep_logs or status:
        log(f"subprocess logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
