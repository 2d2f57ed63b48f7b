#!/usr/bin/env python3
"""A minimal, fast MongoDB-wire backend with canned replies, for benchmarking dvara.

    python scripts/canned_backend.py --port N

It answers as a one-member replica set "canned": hello / isMaster (OP_MSG, and legacy
OP_QUERY isMaster answered with an OP_REPLY) get a fixed hello document naming
127.0.0.1:N; every other OP_MSG gets ``{ok: 1}`` (every other OP_QUERY an OP_REPLY
``{ok: 1}``); legacy writes get nothing. responseTo echoes the request's requestID.

One thread, one epoll loop, blocking sockets used only when epoll says they are ready;
the replies are pre-encoded, so a message costs one recv, one header unpack, one
startswith and one send. It prints ``canned backend ready on 127.0.0.1:N`` when it
accepts, and exits on SIGTERM/SIGINT or when stdin is closed (--exit-on-stdin-eof).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import struct
import sys

import bson
from bson import ObjectId

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
NO_REPLY = frozenset({2001, 2002, 2006, 2007})

_HEADER = struct.Struct("<iiii")
_LEN = struct.Struct("<i")
_HELLO_KEYS = (b"hello\x00", b"isMaster\x00", b"ismaster\x00")
_HELLO_KEY_OFFSET = 26  # 16 header + 4 flagBits + 1 section kind + 4 doc size + 1 type


def hello_doc(port: int) -> dict:
    me = f"127.0.0.1:{port}"
    return {
        "helloOk": True,
        "isWritablePrimary": True,
        "ismaster": True,
        "secondary": False,
        "setName": "canned",
        "setVersion": 1,
        "hosts": [me],
        "primary": me,
        "me": me,
        "topologyVersion": {"processId": ObjectId(), "counter": 0},
        "maxBsonObjectSize": 16777216,
        "maxMessageSizeBytes": 48000000,
        "maxWriteBatchSize": 100000,
        "logicalSessionTimeoutMinutes": 30,
        "minWireVersion": 0,
        "maxWireVersion": 17,
        "ok": 1.0,
    }


def _msg_body(doc: dict) -> bytes:
    return b"\x00\x00\x00\x00\x00" + bson.encode(doc)   # flagBits 0, section kind 0


def _reply_body(doc: dict) -> bytes:
    return struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(doc)


class Canned:
    def __init__(self, port: int) -> None:
        hello = hello_doc(port)
        ok = {"ok": 1.0}
        self.msg_ok = _msg_body(ok)
        self.msg_hello = _msg_body(hello)
        self.reply_ok = _reply_body(ok)
        self.reply_hello = _reply_body(hello)
        self.messages = 0

    def answer(self, frame: bytes) -> bytes | None:
        """The reply to one whole frame (slow path, for anything but a plain OP_MSG)."""
        _, rid, _, op = _HEADER.unpack_from(frame, 0)
        if op == OP_MSG:
            if _LEN.unpack_from(frame, 16)[0] & 2:      # moreToCome: no reply
                return None
            hello = frame.startswith(_HELLO_KEYS, _HELLO_KEY_OFFSET)
            body = self.msg_hello if hello else self.msg_ok
            return _HEADER.pack(16 + len(body), rid, rid, OP_MSG) + body
        if op == OP_QUERY:
            ns_end = frame.index(b"\x00", 20)
            doc_start = ns_end + 1 + 8
            key_start = doc_start + 5
            is_hello = frame.startswith(_HELLO_KEYS, key_start) or frame.startswith(
                (b"$query\x00", b"query\x00"), key_start) and any(
                k.rstrip(b"\x00") in frame[key_start:key_start + 64] for k in _HELLO_KEYS)
            body = self.reply_hello if is_hello else self.reply_ok
            return _HEADER.pack(16 + len(body), rid, rid, OP_REPLY) + body
        if op in NO_REPLY:
            return None
        body = self.reply_ok
        return _HEADER.pack(16 + len(body), rid, rid, OP_REPLY) + body


def serve(port: int, ready_line: bool = True, watch_stdin: bool = False) -> None:
    canned = Canned(port)
    msg_ok = canned.msg_ok
    msg_ok_len = 16 + len(msg_ok)
    hello_keys = _HELLO_KEYS
    header = _HEADER
    unpack_len = _LEN.unpack_from

    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    stdin_fd = -1
    if watch_stdin:
        stdin_fd = sys.stdin.fileno()
        ep.register(stdin_fd, select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    bufs: dict[int, bytearray] = {}
    lfd = listener.fileno()
    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if ready_line:
        print(f"canned backend ready on 127.0.0.1:{port}", flush=True)

    def close(fd: int) -> None:
        sock = conns.pop(fd, None)
        bufs.pop(fd, None)
        if sock is not None:
            try:
                ep.unregister(fd)
            except OSError:
                pass
            sock.close()

    while running[0]:
        try:
            events = ep.poll(1.0)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == lfd:
                for _ in range(256):
                    try:
                        sock, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(True)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            if fd == stdin_fd:
                if not os.read(stdin_fd, 4096):
                    running[0] = False
                continue
            sock = conns.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                close(fd)
                continue
            if not data:
                close(fd)
                continue
            pending = bufs.get(fd)
            if pending is None and len(data) >= 26:
                # Fast path: exactly one plain OP_MSG that is not a hello.
                length, rid, _, op = header.unpack_from(data, 0)
                if (length == len(data) and op == OP_MSG and not data[16] & 2
                        and not data.startswith(hello_keys, 26)):
                    canned.messages += 1
                    try:
                        sock.sendall(header.pack(msg_ok_len, rid, rid, OP_MSG) + msg_ok)
                    except OSError:
                        close(fd)
                    continue
            buf = bytearray(data) if pending is None else pending + data
            out = []
            pos = 0
            n = len(buf)
            while n - pos >= 4:
                length = unpack_len(buf, pos)[0]
                if length < 16 or length > 48_000_000:
                    out = None
                    break
                if n - pos < length:
                    break
                reply = canned.answer(bytes(buf[pos:pos + length]))
                canned.messages += 1
                if reply is not None:
                    out.append(reply)
                pos += length
            if out is None:
                close(fd)
                continue
            if pos < n:
                bufs[fd] = buf[pos:]
            else:
                bufs.pop(fd, None)
            if out:
                try:
                    sock.sendall(b"".join(out))
                except OSError:
                    close(fd)
    for fd in list(conns):
        close(fd)
    listener.close()
    ep.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="exit when stdin is closed (the parent died)")
    args = parser.parse_args(argv)
    serve(args.port, watch_stdin=args.exit_on_stdin_eof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
