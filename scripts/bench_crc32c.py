#!/usr/bin/env python3
"""CRC-32C of a 16 MB checksummed OP_MSG: the old pure-Python table loop against the
``crc32c`` package dvara now uses (dvara_lib.wire.crc32c).

    python scripts/bench_crc32c.py [--size-mb 16]

Builds one OP_MSG of about --size-mb MB (a body document with one binary field) with
the checksum flag, times the checksum of everything before its last 4 bytes once with
each implementation (the way dvara_lib.wire.check_msg_flags does when it clears an
unknown optional flag bit), checks both give the same value, and prints both times and
their ratio. One run on the project's 2-core machine (crc32c 2.9.post0, hardware_based
True): 1962 ms before, 1.4 ms after, about 1400x.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bson  # noqa: E402
import crc32c  # noqa: E402

from dvara_lib import wire  # noqa: E402

_CASTAGNOLI_REVERSED = 0x82F63B78


def _table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ _CASTAGNOLI_REVERSED if crc & 1 else crc >> 1
        table.append(crc)
    return table


def pure_python_crc32c(data: bytes, table: list[int]) -> int:
    """The "before": dvara's former table loop, byte by byte."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksummed_msg(size: int) -> bytes:
    """An OP_MSG of about size bytes with CHECKSUM_PRESENT and a valid checksum."""
    body = bson.encode({"insert": "c", "$db": "bench", "blob": os.urandom(size - 100)})
    payload = struct.pack("<I", wire.CHECKSUM_PRESENT) + b"\x00" + body
    header = struct.pack("<iiii", 16 + len(payload) + 4, 1, 0, wire.OP_MSG)
    unsummed = header + payload
    return unsummed + struct.pack("<I", crc32c.crc32c(unsummed))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=16.0)
    args = p.parse_args(argv)
    frame = checksummed_msg(int(args.size_mb * 1024 * 1024))
    covered = frame[:-4]
    table = _table()
    start = time.perf_counter()
    before = pure_python_crc32c(covered, table)
    before_s = time.perf_counter() - start
    start = time.perf_counter()
    after = wire.crc32c(covered)
    after_s = time.perf_counter() - start
    if before != after or after != struct.unpack("<I", frame[-4:])[0]:
        print(f"MISMATCH: pure Python {before:#010x}, package {after:#010x}")
        return 1
    print(f"message: {len(frame):,} bytes (OP_MSG, checksum {after:#010x})")
    print(f"before (pure-Python table loop): {before_s * 1000:10.1f} ms")
    print(f"after  (crc32c {crc32c.__version__}, hardware_based={crc32c.hardware_based}): "
          f"{after_s * 1000:10.3f} ms")
    print(f"ratio: {before_s / after_s:,.0f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
