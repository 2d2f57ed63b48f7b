#!/usr/bin/env python3
"""Idle clients: what thousands of connected, mostly idle clients cost dvara.

    python scripts/bench.py idle [--clients 15000] [--max-await-ms 10000] [--pings 2000]
                                 [--dvara-variant NAME=ARGS ...] [--dvara-ref COMMIT]
                                 [--json FILE]

(A subcommand of bench.py rather than a script of its own so that there is one entry
point, and so that it shares bench.py's dvara snapshot, backend, variant syntax and
cleanup, from benchkit.py; the code lives here to keep each file readable.)

For each dvara variant (default `dvara=`): start the canned C backend and dvara with
--max-client-connections and --max-per-client-connections raised to fit, then --clients
clients from load processes of at most --per-process sockets each (the descriptor limit
is 20,000 per process). Each client sends one OP_MSG {hello: 1}; one in --parked-every
(a third) then sends an awaitable {hello: 1, topologyVersion: <from its answer>,
maxAwaitTimeMS: M} and sends the next one as soon as it is answered, like a driver's
monitor; the others stay idle. Client sockets are bound to 127.0.0.2, 127.0.0.3, ...
(--per-source-ip each) before connecting: loopback has about 28,000 ephemeral ports per
source address and destination.

Measured: how many clients were admitted (got their hello answer); dvara's RSS (VmRSS
summed over its process tree) before the clients and with them, hence KB per client; its
thread count before and with them (the most seen); every parked hello's lateness (answer
time minus send time minus M), late when over --late-tolerance-ms, and any still
unanswered past M + tolerance at the end; the median and p99 of --pings pings sent one at
a time from a separate client, without the clients and with them. The clients are held at
least until every first parked hello must have been answered.

Everything is on loopback; every loop is bounded in count and time; load processes,
dvara and the backend are stopped at exit, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import sys
import time
from typing import Any, Optional

import benchkit as kit

IP_BIND_ADDRESS_NO_PORT = 24      # linux/in.h: pick the port at connect(), per 4-tuple
MAX_INFLIGHT = 256                # connects + first hellos outstanding per load process
HELLO_TIMEOUT = 30.0              # a client whose first hello is not answered by then failed
CONNECTING, HELLO, PARKED, IDLE = range(4)


# --------------------------------------------------------------------------- load process

class IdleLoad:
    """One load process's clients, driven by one epoll loop (state per descriptor)."""

    def __init__(self, port: int, first: int, count: int, args: dict[str, Any]) -> None:
        self.port, self.first, self.count = port, first, count
        self.per_ip, self.every = args["per_source_ip"], args["parked_every"]
        self.max_await = args["max_await_ms"] / 1000.0
        self.ep = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.state: dict[int, int] = {}
        self.parked: set[int] = set()
        self.sent: dict[int, float] = {}
        self.inflight: dict[int, float] = {}
        self.bufs: dict[int, bytes] = {}
        self.hello = kit.op_msg({"hello": 1, "$db": "admin"}, 1)
        self.late: list[float] = []
        self.stats = {"admitted": 0, "failed": 0, "closed_by_server": 0, "unexpected": 0}
        self.fail_reasons: dict[str, int] = {}
        self.stopping = False

    def open(self, i: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((f"127.0.0.{2 + i // self.per_ip}", 0))
            err = s.connect_ex(("127.0.0.1", self.port))
        except OSError as exc:
            err = exc.errno or -1
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.fail(None, f"connect: {errno.errorcode.get(err, err)}")
            return
        fd = s.fileno()
        self.socks[fd], self.state[fd], self.inflight[fd] = s, CONNECTING, time.monotonic()
        if i % self.every == 0:
            self.parked.add(fd)
        self.ep.register(fd, select.EPOLLOUT)

    def fail(self, fd: Optional[int], reason: str) -> None:
        self.stats["failed"] += 1
        self.fail_reasons[reason] = self.fail_reasons.get(reason, 0) + 1
        if fd is not None:
            self.drop(fd)

    def drop(self, fd: int) -> None:
        for d in (self.state, self.sent, self.inflight, self.bufs):
            d.pop(fd, None)
        self.parked.discard(fd)
        s = self.socks.pop(fd, None)
        if s is not None:
            self.ep.unregister(fd)
            s.close()

    def poll(self, timeout: float) -> None:
        for fd, _ in self.ep.poll(timeout, 2048):
            if fd not in self.state:
                continue
            if self.state[fd] == CONNECTING:
                self.connected(fd)
            else:
                self.readable(fd)

    def connected(self, fd: int) -> None:
        err = self.socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(fd, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.socks[fd].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ep.modify(fd, select.EPOLLIN)
        self.send(fd, self.hello, HELLO)

    def send(self, fd: int, frame: bytes, state: int) -> None:
        try:
            self.socks[fd].send(frame)   # small, into an empty socket buffer
        except OSError as exc:
            self.fail(fd, f"send: {exc.__class__.__name__}")
            return
        self.state[fd], self.sent[fd] = state, time.monotonic()

    def readable(self, fd: int) -> None:
        try:
            chunk = self.socks[fd].recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            if self.state[fd] == HELLO:
                self.fail(fd, "closed before the hello answer")
            else:
                self.stats["closed_by_server"] += 1
                self.drop(fd)
            return
        data = self.bufs.pop(fd, b"") + chunk
        while len(data) >= 4 and fd in self.state:
            n = struct.unpack_from("<i", data)[0]
            if len(data) < n:
                break
            self.frame(fd, data[:n])
            data = data[n:]
        if data and fd in self.state:
            self.bufs[fd] = data

    def frame(self, fd: int, frame: bytes) -> None:
        now, state = time.monotonic(), self.state[fd]
        doc = kit.reply_doc(frame)
        if state == IDLE:
            self.stats["unexpected"] += 1
            return
        if doc.get("ok") != 1 or "topologyVersion" not in doc:
            self.fail(fd, f"hello answer: {str(doc)[:80]}")
            return
        if state == HELLO:
            self.stats["admitted"] += 1
            del self.inflight[fd]
        else:
            self.late.append(now - self.sent[fd] - self.max_await)
        if fd in self.parked and not self.stopping:
            self.send(fd, kit.op_msg({"hello": 1, "topologyVersion": doc["topologyVersion"],
                                      "maxAwaitTimeMS": int(self.max_await * 1000),
                                      "$db": "admin"}, 2), PARKED)
        else:
            self.state[fd] = IDLE

    def connect_all(self, deadline: float) -> None:
        """Open every client (at most MAX_INFLIGHT unanswered at once) until deadline."""
        i = 0
        while (i < self.count or self.inflight) and time.monotonic() < deadline:
            while i < self.count and len(self.inflight) < MAX_INFLIGHT:
                self.open(self.first + i)
                i += 1
            self.poll(0.05)
            now = time.monotonic()
            for fd in [fd for fd, t in self.inflight.items() if now - t > HELLO_TIMEOUT]:
                self.fail(fd, "no hello answer in time")
        for fd in list(self.inflight):
            self.fail(fd, "connect phase timed out")
        for _ in range(self.count - i):
            self.fail(None, "never started (connect phase timed out)")

    def hold(self, stop: Any, deadline: float) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            self.poll(0.1)

    def result(self, tolerance: float) -> dict[str, Any]:
        now = time.monotonic()
        overdue = sum(1 for fd in self.parked if self.state.get(fd) == PARKED
                      and now - self.sent[fd] > self.max_await + tolerance)
        return dict(self.stats, fail_reasons=self.fail_reasons, late=self.late,
                    parked=len(self.parked), overdue=overdue)

    def close(self) -> None:
        for fd in list(self.socks):
            self.drop(fd)
        self.ep.close()


def load_process(port: int, first: int, count: int, args: dict[str, Any], stop: Any,
                 results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    load = IdleLoad(port, first, count, args)
    try:
        load.connect_all(time.monotonic() + args["connect_timeout"])
        results.put(("ready", dict(load.stats, fail_reasons=load.fail_reasons)))
        load.hold(stop, time.monotonic() + args["hold_limit"])
        load.stopping = True
        results.put(("done", load.result(args["late_tolerance_ms"] / 1000.0)))
    except Exception as exc:  # noqa: BLE001
        results.put(("fail", repr(exc)[:500]))
    finally:
        load.close()


# --------------------------------------------------------------------------- measurements

def ping_probe(port: int, count: int, time_limit: float = 60.0) -> dict[str, Any]:
    """count pings, one at a time, on one fresh connection from 127.0.0.1 (after 20 of
    warm-up); latency percentiles in ms, and the error that cut it short if any."""
    frame = kit.op_msg({"ping": 1, "$db": "admin"}, 7)
    lat, errors, failure = [], 0, None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + time_limit
            for i in range(count + 20):
                if time.monotonic() > deadline:
                    break
                t = time.perf_counter()
                s.sendall(frame)
                reply = kit.read_frame(s)
                if i >= 20:
                    lat.append(time.perf_counter() - t)
                errors += b"errmsg" in reply
    except OSError as exc:
        failure = f"ping probe: {exc!r}"
    lat.sort()
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: None)
    return {"pings": len(lat), "errors": errors, "failure": failure, "p50_ms": pick(0.5),
            "p99_ms": pick(0.99), "max_ms": pick(1.0)}


def _split(total: int, most: int) -> list[tuple[int, int]]:
    """(first index, count) for ceil(total / most) load processes, as even as possible."""
    n = max(1, math.ceil(total / most))
    sizes = [total // n + (1 if i < total % n else 0) for i in range(n)]
    return [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]


def _collect(results: Any, kind: str, n: int, timeout: float) -> list[dict[str, Any]]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            k, payload = results.get(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001  (queue.Empty)
            continue
        if k == "fail":
            raise RuntimeError(f"a load process failed: {payload}")
        got.append(payload)
    if len(got) < n:
        raise RuntimeError(f"load processes: {len(got)} of {n} {kind!r} in {timeout:.0f}s")
    return got


def watch(root: int, until: float, seen: dict[str, int]) -> None:
    """Sample the tree's threads and RSS once a second until until; keep the most seen."""
    while time.monotonic() < until:
        st = kit.tree_status(root)
        seen["threads"] = max(seen["threads"], st["threads"])
        seen["rss_kb"] = max(seen["rss_kb"], st["rss_kb"])
        time.sleep(min(1.0, max(0.0, until - time.monotonic())))


# --------------------------------------------------------------------------- one variant

def dvara_limits(args: argparse.Namespace) -> list[str]:
    room = str(args.clients + 1000)
    return ["--max-client-connections", room, "--max-per-client-connections", room]


def run_variant(args: argparse.Namespace, procs: kit.Procs, backend: kit.Target, name: str,
                extra: list[str]) -> dict[str, Any]:
    dv = kit.start_dvara(procs, args.dvara_script, backend, name, dvara_limits(args) + extra)
    try:
        time.sleep(1.0)
        rec = {"variant": name, "args": extra, "clients": args.clients,
               "ping_without": ping_probe(dv.port, args.pings)}
        rec["before"] = kit.tree_status(dv.proc.pid)
        rec.update(with_clients(args, dv))
        return rec
    finally:
        procs.stop(dv.proc)


def with_clients(args: argparse.Namespace, dv: kit.Target) -> dict[str, Any]:
    """Connect the clients, measure with them in place, hold, collect, close them."""
    ctx = mp.get_context("fork")
    stop, results = ctx.Event(), ctx.Queue()
    params = {k: getattr(args, k) for k in ("per_source_ip", "parked_every", "max_await_ms",
                                            "connect_timeout", "late_tolerance_ms")}
    params["hold_limit"] = args.settle + 120 + 3 * args.max_await_ms / 1000.0
    loads = [ctx.Process(target=load_process, args=(dv.port, first, n, params, stop, results),
                         daemon=True) for first, n in _split(args.clients, args.per_process)]
    try:
        t0 = time.monotonic()
        for p in loads:
            p.start()
        ready = _collect(results, "ready", len(loads), args.connect_timeout + 60)
        out = {"connect_s": round(time.monotonic() - t0, 1), "ready": ready}
        out.update(measure_held(args, dv, time.monotonic()))
        stop.set()
        out["done"] = _collect(results, "done", len(loads), 60)
        for p in loads:
            p.join(30)   # they close their sockets before dvara is stopped
        return out
    finally:
        stop.set()
        for p in loads:
            if p.is_alive():
                p.kill()
                p.join(5)


def measure_held(args: argparse.Namespace, dv: kit.Target, t_ready: float) -> dict[str, Any]:
    """With every client connected (and parking): RSS, threads, pings, CPU while held."""
    time.sleep(args.settle)
    st = kit.tree_status(dv.proc.pid)
    seen = dict(st)
    pings = ping_probe(dv.port, args.pings)
    cpu0, c0 = kit.tree_cpu(dv.proc.pid), time.monotonic()
    # hold until every first parked hello (sent before t_ready) must have come back, and
    # for at least 2 s after the pings (the window for dvara's CPU while held)
    watch(dv.proc.pid, max(t_ready + (args.max_await_ms + args.late_tolerance_ms) / 1000 + 1,
                           c0 + 2.0), seen)
    cpu = (kit.tree_cpu(dv.proc.pid) - cpu0) / max(time.monotonic() - c0, 1e-9)
    return {"with": st, "most_seen": seen, "ping_with": pings,
            "cpu_pct_while_held": round(100 * cpu, 1)}


# --------------------------------------------------------------------------- report

def summary(rec: dict[str, Any], tolerance_ms: float) -> dict[str, Any]:
    done, before = rec["done"], rec["before"]
    late = sorted(x for d in done for x in d["late"])
    admitted = sum(d["admitted"] for d in rec["ready"])
    reasons: dict[str, int] = {}
    for d in done:   # each load process's final, cumulative counts
        for k, v in d["fail_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    return {
        "variant": rec["variant"], "clients": rec["clients"], "admitted": admitted,
        "failed": rec["clients"] - admitted, "fail_reasons": reasons,
        "closed_by_server": sum(d["closed_by_server"] for d in done),
        "parked": sum(d["parked"] for d in done), "parked_answers": len(late),
        "late": sum(1 for x in late if x * 1e3 > tolerance_ms),
        "early": sum(1 for x in late if x * 1e3 < -tolerance_ms),
        "worst_late_ms": late[-1] * 1e3 if late else None,
        "median_late_ms": statistics.median(late) * 1e3 if late else None,
        "p99_late_ms": late[min(len(late) - 1, int(0.99 * len(late)))] * 1e3 if late else None,
        "overdue": sum(d["overdue"] for d in done),
        "rss_before_kb": before["rss_kb"], "rss_with_kb": rec["with"]["rss_kb"],
        "kb_per_client": (rec["with"]["rss_kb"] - before["rss_kb"]) / max(admitted, 1),
        "threads_before": before["threads"], "threads_most": rec["most_seen"]["threads"],
        "processes": rec["with"]["processes"], "ping_without": rec["ping_without"],
        "ping_with": rec["ping_with"], "cpu_pct_while_held": rec["cpu_pct_while_held"],
        "connect_s": rec["connect_s"]}


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| dvara | clients admitted | parked hellos answered / late / unanswered | "
             "lateness median / worst ms | RSS before → with MB | KB per client | "
             "threads before → most | ping p50 / p99 ms, no clients | "
             "ping p50 / p99 ms, with clients | dvara CPU % while held |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        f = lambda v, p="{:.2f}": "n/a" if v is None else p.format(v)  # noqa: E731
        pw, pc = r["ping_without"], r["ping_with"]
        lines.append(
            f"| {r['variant']} | {r['admitted']:,} of {r['clients']:,} "
            f"| {r['parked_answers']:,} / {r['late']} / {r['overdue']} "
            f"| {f(r['median_late_ms'], '{:.0f}')} / {f(r['worst_late_ms'], '{:.0f}')} "
            f"| {r['rss_before_kb'] / 1024:.1f} → {r['rss_with_kb'] / 1024:.1f} "
            f"| {r['kb_per_client']:.2f} | {r['threads_before']} → {r['threads_most']} "
            f"| {f(pw['p50_ms'])} / {f(pw['p99_ms'])} | {f(pc['p50_ms'])} / {f(pc['p99_ms'])} "
            f"| {r['cpu_pct_while_held']:.0f} |")
    return "\n".join(lines)


def verdict(r: dict[str, Any]) -> str:
    """The guardrail's yes/no parts (KB per client and ping latency are read by eye)."""
    missed = [text for bad, text in (
        (r["admitted"] < r["clients"], "not every client was admitted"),
        (r["late"] or r["overdue"], "parked hellos were late or unanswered"),
        (r["threads_most"] > r["threads_before"], "the thread count grew"),
        (r["ping_with"]["failure"] or r["ping_with"]["errors"], "pings failed")) if bad]
    return "Guardrail: " + ("; ".join(missed) if missed else
                            "every client admitted, every parked hello on time, "
                            "no new threads") + "."


def report(run: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    m = run["machine"]
    out = [f"## dvara idle clients, {m['date']}", "",
           f"Machine: {m['hostname']}, {m['nproc']} CPU(s) {m['cpu_model']}, Linux "
           f"{m['kernel']}, {m['implementation']} {m['python']}; load average at start "
           f"{m['loadavg_at_start']}.  ",
           f"dvara measured: {run['source']['source']}; git describe "
           f"{run['source']['describe']}. Backend: {run['backend']}.  ",
           f"Command: `{run['command']}`: {args.clients:,} clients from load processes of at "
           f"most {args.per_process:,}; one in {args.parked_every} parks an awaitable hello "
           f"(maxAwaitTimeMS {args.max_await_ms}, late if over it by more than "
           f"{args.late_tolerance_ms:g} ms); {args.pings} pings one at a time.", "",
           table(rows, args), ""]
    for r in rows:
        extra = []
        if r["failed"]:
            extra.append(f"{r['failed']} client(s) not admitted: {r['fail_reasons']}")
        for probe in ("ping_without", "ping_with"):
            if r[probe]["failure"] or r[probe]["errors"]:
                extra.append(f"{probe}: {r[probe]['pings']} pings, {r[probe]['errors']} "
                             f"error replies, {r[probe]['failure'] or 'no failure'}")
        if r["early"] or r["closed_by_server"]:
            extra.append(f"{r['early']} parked hello(s) answered early, "
                         f"{r['closed_by_server']} client(s) closed by dvara")
        out.append(f"- {r['variant']}: {r['processes']} process(es); clients connected in "
                   f"{r['connect_s']} s" + "".join(f"; {e}" for e in extra) + ". "
                   f"{verdict(r)}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.py idle", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=15000, help="clients in all (15000)")
    ap.add_argument("--per-process", type=int, default=15000,
                    help="most sockets per load process (15000; the fd limit is 20,000)")
    ap.add_argument("--per-source-ip", type=int, default=7500,
                    help="clients per source address 127.0.0.2, .3, ... (7500)")
    ap.add_argument("--parked-every", type=int, default=3,
                    help="one client in this many parks an awaitable hello (3)")
    ap.add_argument("--max-await-ms", type=int, default=10000, help="maxAwaitTimeMS (10000)")
    ap.add_argument("--late-tolerance-ms", type=float, default=500.0,
                    help="a parked hello answered later than M + this is late (500)")
    ap.add_argument("--pings", type=int, default=2000, help="pings per latency probe (2000)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between the last client connected and the measurements (2)")
    ap.add_argument("--connect-timeout", type=float, default=180.0,
                    help="most seconds for connecting every client (180)")
    ap.add_argument("--dvara-variant", action="append", metavar="NAME=ARGS",
                    help="dvara with extra arguments (repeatable; default 'dvara=')")
    ap.add_argument("--dvara-ref", metavar="COMMIT", help="measure dvara as of this commit")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--keep-logs", action="store_true", help="keep the subprocess logs")
    args = ap.parse_args(argv)
    _check(args, ap)
    return args


def _check(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    if not 1 <= args.clients <= 200_000 or not 1 <= args.per_process <= 18_000:
        ap.error("--clients 1-200000, --per-process 1-18000")
    if not 1 <= args.per_source_ip <= 25_000 or args.clients / args.per_source_ip > 250:
        ap.error("--per-source-ip: 1-25000, and at most 250 source addresses")
    if args.parked_every < 1 or not 0 <= args.max_await_ms <= 600_000:
        ap.error("--parked-every >= 1, --max-await-ms 0-600000")
    if not 1 <= args.pings <= 100_000 or not 0 <= args.settle <= 600:
        ap.error("--pings 1-100000, --settle 0-600")
    try:
        args.variants = [kit.parse_variant(v) for v in args.dvara_variant or ["dvara="]]
    except ValueError as exc:
        ap.error(str(exc))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run = {"machine": kit.machine_info(), "source": kit.source_info(args.dvara_ref),
           "command": " ".join(["python scripts/bench.py idle", *argv])}
    workdir, rows, status = kit.make_workdir(), [], 0
    procs, old_term = kit.Procs(workdir), kit.on_sigterm_raise()
    try:
        args.dvara_script = kit.snapshot_dvara(os.path.join(workdir, "dvara-src"), args.dvara_ref)
        backend, run["backend"] = kit.start_backend(procs, workdir)
        for name, extra in args.variants:
            print(f"{name}: {args.clients:,} clients ...", file=sys.stderr, flush=True)
            rec = run_variant(args, procs, backend, name, extra)
            rows.append(summary(rec, args.late_tolerance_ms))
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001
        print(f"bench idle failed: {exc}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old_term)
    return finish(args, run, rows, status, workdir)


def finish(args: argparse.Namespace, run: dict[str, Any], rows: list[dict[str, Any]],
           status: int, workdir: str) -> int:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": run, "complete": status == 0, "rows": rows}, f, indent=1,
                      default=str)
    if rows:
        print(report(run, rows, args), flush=True)
    if args.keep_logs or status:
        print(f"subprocess logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
