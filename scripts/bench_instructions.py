#!/usr/bin/env python3
"""Instructions per relayed message, counted by valgrind's callgrind: a measure of the
relay's own work that does not depend on how busy the (shared) machine is.

Usage: python scripts/bench_instructions.py [--messages N] [--clients 1,32]
                                            [--dvara-ref COMMIT ...] [--floor-relay FILE]

Each relay (the floor relay, dvara from the working tree, dvara as of each --dvara-ref)
runs under ``valgrind --tool=callgrind`` in front of the canned C backend. After a warm-up
the counters are zeroed, the clients send N raw ``{ping: 1}`` messages (one client at a
time in turn, or 32 sockets with one message in flight each), the counters are dumped,
and the instructions executed in user space by the whole relay process (every thread)
are divided by the messages. Kernel time is not counted: the CPU per message that
``scripts/bench.py`` reports adds the system calls and the wake-ups. Counts repeat to
within a fraction of a per cent between runs; the same relay run twice gives the same
figure whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchkit as kit  # noqa: E402

WARM_UP = 300
READY_TIMEOUT = 180.0


def _valgrind(out_dir: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p",
            os.path.realpath(sys.executable)]


def _start(procs: kit.Procs, name: str, args: list[str], port: int, ready: Optional[str],
           out_dir: str) -> subprocess.Popen:
    proc = procs.start(name, _valgrind(out_dir) + args, cwd=os.path.dirname(args[0]))
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{kit.log_tail(proc)}")
        with open(proc.log_base + ".out", errors="replace") as f:  # type: ignore[attr-defined]
            started = ready is None or ready in f.read()
        if started:
            try:
                kit.wait_port(port, 1.0, proc)
                return proc
            except (OSError, RuntimeError, TimeoutError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not start under valgrind in {READY_TIMEOUT:.0f}s")


def _pings(port: int, clients: int, messages: int) -> None:
    """messages pings over clients sockets, one in flight per socket."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(clients)]
    frame = kit.op_msg({"ping": 1, "$db": "admin"}, 7)
    try:
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = done = 0
        for s in socks[:messages]:
            s.sendall(frame)
            sent += 1
        while done < messages:
            ready, _, _ = select.select(socks, [], [], 60)
            if not ready:
                raise RuntimeError("no reply within 60 s")
            for s in ready:
                kit.read_frame(s)
                done += 1
                if sent < messages:
                    s.sendall(frame)
                    sent += 1
    finally:
        for s in socks:
            s.close()


def _dump_total(out_dir: str, pid: int, before: set[str]) -> int:
    """The instructions of the dump callgrind_control just wrote for pid."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(glob.glob(f"{out_dir}/cg.{pid}.*")) - before)
        for path in new:
            with open(path, errors="replace") as f:
                text = f.read()
            m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
            if m:
                return int(m.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump from {pid}")


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], capture_output=True, timeout=60,
                   check=True)


def measure(procs: kit.Procs, name: str, args: list[str], port: int, ready: Optional[str],
            clients: int, messages: int, out_dir: str) -> float:
    """Instructions per message of one relay with clients clients."""
    proc = _start(procs, name, args, port, ready, out_dir)
    try:
        _pings(port, clients, WARM_UP)
        _control("-z", proc.pid)
        before = set(glob.glob(f"{out_dir}/cg.{proc.pid}.*"))
        _pings(port, clients, messages)
        _control("-d", proc.pid)
        return _dump_total(out_dir, proc.pid, before) / messages
    finally:
        procs.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages per count (2000)")
    ap.add_argument("--clients", default="1,32", help="client counts (1,32)")
    ap.add_argument("--dvara-ref", action="append", default=[], metavar="COMMIT",
                    help="also count dvara as of this commit (repeatable)")
    ap.add_argument("--floor-relay", default=kit.DEFAULT_FLOOR, metavar="FILE",
                    help=f"the floor relay script ({kit.DEFAULT_FLOOR}); none if absent")
    args = ap.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind is needed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",")]
    workdir = kit.make_workdir()
    procs = kit.Procs(workdir)
    kit.on_sigterm_raise()
    try:
        backend, _ = kit.start_backend(procs, workdir)
        relays = _relays(args, workdir, backend.port)
        print(f"{'relay':<24} {'clients':>7} {'instructions/msg':>17}")
        for name, argv, ready in relays:
            for n in clients:
                port = kit.free_port()
                full = [a.replace("{port}", str(port)) for a in argv]
                got = measure(procs, name, full, port, ready, n, args.messages, workdir)
                print(f"{name:<24} {n:>7} {got:>17,.0f}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _relays(args: argparse.Namespace, workdir: str,
            backend: int) -> list[tuple[str, list[str], Optional[str]]]:
    """(name, argv with {port}, line that says it is ready) for each relay counted."""
    out: list[tuple[str, list[str], Optional[str]]] = []
    if os.path.isfile(args.floor_relay):
        out.append(("floor", [os.path.abspath(args.floor_relay), "{port}", str(backend)], None))
    for ref in [None, *args.dvara_ref]:
        script = kit.snapshot_dvara(os.path.join(workdir, f"dvara-{ref or 'tree'}"), ref)
        out.append((f"dvara {ref or '(tree)'}",
                    [script, "--addrs", f"127.0.0.1:{backend}", "--port-start", "{port}",
                     "--port-end", "{port}", "--log-level", "warning"], "dvara is ready"))
    return out


if __name__ == "__main__":
    sys.exit(main())
