#!/usr/bin/env python3
"""Fuzz dvara's frame reader and handshake handling with 100,000+ inputs.

    python scripts/fuzz.py [--inputs 100000] [--live-frames 20000] [--connections 32]
                           [--seed N] [--live-seconds 300]

Phase 1, in process (tests/fuzz_harness.py): each input is a stream of 1-5 fuzzed frames
(hellos of every shape with odd values, legacy commands, writes, compressed and
checksummed messages; mutated, spliced, truncated, or noise) written in random pieces to
a real ClientConn; every frame it yields goes through the wire decoders and a real Relay
over a fake two-member topology. Checked for every input: only ProtocolError escapes the
reader and decoders, the relay hands the client back exactly once, logs no unexpected
error, answers within its timeouts with well-formed replies to the right request, leaves
nothing checked out of a pool; every 1,000 inputs a well-behaved client is served; at the
end no socket is left open.

Phase 2, live: SecantusDB and dvara as subprocesses; fuzzed frames from --connections
raw connections (reconnecting when dvara closes one); then dvara must still run, serve a
pymongo client, have logged no traceback, and have closed every fuzzing client's socket.

Exit status 0 when every check held; the seed of a failing input is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzz_harness import FuzzFailure, Mutator, RelayHarness, throw_frames  # noqa: E402


def in_process(inputs: int, seed: int) -> tuple[int, list[str]]:
    """Run the in-process phase; (frames served, failures)."""
    harness = RelayHarness()
    failures: list[str] = []
    frames = 0
    start = time.monotonic()
    try:
        for i in range(inputs):
            rng = random.Random(seed + i)
            try:
                harness.run_input(rng, frames=rng.randrange(1, 6))
                if (i + 1) % 1000 == 0:
                    harness.check_bystander()
            except FuzzFailure as exc:
                failures.append(f"input seed {seed + i}: {exc}"[:2000])
                frames += harness.frames
                harness.close()
                harness = RelayHarness()
                if len(failures) >= 10:
                    break
            if (i + 1) % 20000 == 0:
                print(f"  {i + 1} inputs, {frames + harness.frames} frames, "
                      f"{time.monotonic() - start:.0f}s", flush=True)
        frames += harness.frames
        print(f"  verdicts {harness.verdicts}, reader ProtocolErrors {harness.reader_errors}"
              " (last harness)")
        harness.check_bystander()
        harness.check_no_leak()
    except FuzzFailure as exc:
        failures.append(f"at the end: {exc}"[:2000])
    finally:
        harness.close()
    return frames, failures


def live(frames: int, connections: int, seed: int, seconds: float) -> list[str]:
    """Run the live phase against dvara in front of SecantusDB; the failures."""
    from pymongo import MongoClient

    from tests.helpers import Dvara, RawClient, Secantus, wait_until

    tmp = Path(tempfile.mkdtemp(prefix="dvara-fuzz-"))
    backend = Secantus(tmp)
    proxy = Dvara(tmp, backend.address, "--message-timeout", "2s", "--max-connections", "8")
    failures: list[str] = []
    try:
        with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
            client.fuzz.c.insert_one({"_id": "before"})
        fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        raw = RawClient(proxy.port)
        tv = raw.command({"hello": 1})["topologyVersion"]
        raw.close()
        stats = throw_frames(proxy.port, Mutator(tv["processId"], tv["counter"]), seed,
                             frames, connections, time.monotonic() + seconds)
        print(f"  {stats}")
        if proxy.proc.poll() is not None:
            return [f"dvara exited with {proxy.proc.returncode}"]
        with MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000) as client:
            client.fuzz.c.insert_one({"_id": "after"})
            for _id in ("before", "after"):
                if client.fuzz.c.find_one({"_id": _id}) != {"_id": _id}:
                    failures.append(f"document {_id!r} read back wrong")
        log = proxy.log()
        for marker in ("Traceback", "unexpected error"):
            if marker in log:
                failures.append(f"dvara logged {marker!r}: see {proxy.log_path}")
        try:
            wait_until(lambda: len(os.listdir(f"/proc/{proxy.pid}/fd")) <= fds + 8,
                       "dvara to close the fuzzing clients", 30)
        except AssertionError as exc:
            failures.append(str(exc))
        closed = log.count("closing <client") + log.count("sent a bad message")
        print(f"  dvara pid {proxy.pid} still serving; {closed} bad-client closes logged; "
              f"{log.count(' WARNING ')} warnings, {log.count(' ERROR ')} errors in its log")
        if stats.frames < frames * 0.9:
            failures.append(f"only {stats.frames} of {frames} frames were sent in time")
    finally:
        proxy.stop()
        backend.stop()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000,
                        help="in-process inputs (streams of 1-5 frames)")
    parser.add_argument("--live-frames", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--live-seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    print(f"fuzz: seed {seed}")
    started = time.monotonic()
    print(f"phase 1: {args.inputs} in-process inputs")
    frames, failures = in_process(args.inputs, seed)
    took = time.monotonic() - started
    print(f"phase 1: {args.inputs} inputs, {frames} frames in {took:.1f}s, "
          f"{len(failures)} failure(s)")
    live_start = time.monotonic()
    if args.live_frames:
        print(f"phase 2: {args.live_frames} live frames over {args.connections} connections")
        live_failures = live(args.live_frames, args.connections, seed, args.live_seconds)
        print(f"phase 2: done in {time.monotonic() - live_start:.1f}s, "
              f"{len(live_failures)} failure(s)")
        failures += live_failures
    total = args.inputs + args.live_frames
    print(f"fuzz: {total} inputs in {time.monotonic() - started:.1f}s: "
          + ("OK" if not failures else f"{len(failures)} FAILURE(S)"))
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
