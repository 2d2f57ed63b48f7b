"""In-process fuzzing of the frame reader, the wire decoders and the relay's handshake
handling; shared by tests/unit/test_fuzz.py (hypothesis, bounded) and scripts/fuzz.py (long runs).

# design:
# Inputs are mutations of seed frames (hellos of every shape, legacy commands, writes,
# compressed and checksummed messages) made with a ``random.Random``, so hypothesis can
# drive and shrink them (``st.randoms()``) and the script can run them fast. Each input is
# written in random pieces into a socketpair read by a real ``ClientConn`` (the acceptor's
# frame reader); every whole frame it yields goes through the wire decoders and then
# through a real ``Relay`` whose members' pools connect to an in-process fake server. The
# checks: only ProtocolError escapes the reader and decoders; the relay hands the client
# back exactly once, never logs an unexpected error, never takes longer than its
# timeouts; every reply is a well-formed frame answering the request (or, in a stream,
# the reply before); nothing stays checked out of a pool; no socket is left open; and a
# well-behaved client served next is answered correctly.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import socket
import struct
import threading
import time
from typing import Any, Callable, Optional

import bson
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.timestamp import Timestamp

from dvara_lib import wire
from dvara_lib.proxy.client import Budget, ClientConn, ClientIO, Fill, ParkedHello, Verdict
from dvara_lib.config import parse_args
from dvara_lib.errors import ConnectionFailure, ProtocolError
from dvara_lib.observe.metrics import Metrics
from dvara_lib.backend.pool import Pool
from dvara_lib.proxy.relay import Relay
from dvara_lib.backend.topology import Member, Topology

MODERN, LEGACY = "10.0.0.1:27017", "10.0.0.2:27017"
MESSAGE_TIMEOUT = 0.5
#: The longest one serve() may take: a pool wait plus a server read, with slack.
SERVE_LIMIT = 3 * MESSAGE_TIMEOUT + 2.0

_INT32 = struct.Struct("<i")
_INTERESTING_INTS = (0, 1, -1, 15, 16, 17, 20, 21, 25, 0x7F, 0x80, 0xFF, 0x7FFF, 0x10000,
                     2 ** 31 - 1, -2 ** 31, 48_000_000, 48_000_001, 16 * 1024 * 1024)
_FLAGS = (0, wire.MORE_TO_COME, wire.EXHAUST_ALLOWED, wire.CHECKSUM_PRESENT, 1 << 5,
          1 << 20, wire.MORE_TO_COME | wire.EXHAUST_ALLOWED, 0xFFFFFFFF)
_HELLO_FIELDS = ("topologyVersion", "maxAwaitTimeMS", "compression", "helloOk", "client",
                 "forShell", "$db", "saslSupportedMechs", "speculativeAuthenticate",
                 "loadBalanced", "$query", "query", "hello", "isMaster", "ismaster")


# -- seeds and mutations -----------------------------------------------------------------

def _weird_values(rng: random.Random, process_id: bson.ObjectId) -> list[Any]:
    return [None, True, False, 0, -1, 1, 2 ** 31 - 1, Int64(2 ** 63 - 1), -(2 ** 63),
            math.nan, math.inf, -math.inf, -0.0, 1e300, 0.5, "", "x" * rng.randrange(1, 64),
            "zlib", "\u00e9\x00", b"\x00\xff", [], ["zlib", "snappy", 7, None], {},
            {"processId": process_id, "counter": Int64(rng.choice((0, 1, 2, -1)))},
            {"processId": "nope", "counter": "x"}, {"counter": math.nan},
            Decimal128("NaN"), Decimal128("1"), Timestamp(1, 1), bson.ObjectId(),
            {"a": {"b": {"c": [1, {"d": None}]}}}]


def _section1(identifier: str, docs: list[dict[str, Any]]) -> bytes:
    payload = identifier.encode() + b"\x00" + b"".join(bson.encode(d) for d in docs)
    return b"\x01" + _INT32.pack(4 + len(payload)) + payload


def _raw_msg(body: bytes, flags: int = 0, req_id: int = 77) -> bytes:
    data = struct.pack("<I", flags) + body
    return wire.HEADER.pack(16 + len(data), req_id, 0, wire.OP_MSG) + data


def _legacy(op: int, body: bytes, req_id: int = 78) -> bytes:
    return wire.HEADER.pack(16 + len(body), req_id, 0, op) + body


def seed_frames(process_id: bson.ObjectId, counter: int) -> list[bytes]:
    """Well-formed messages of every kind a client sends, hellos first."""
    tv = {"processId": process_id, "counter": Int64(counter)}
    client_meta = {"driver": {"name": "fuzz", "version": "1"}, "os": {"type": "Linux"}}
    ping = wire.op_msg({"ping": 1, "$db": "admin"})
    hello_legacy = wire.op_query("admin.$cmd", {"isMaster": 1, "helloOk": True,
                                                "client": client_meta, "compression": ["zlib"]})
    body = bson.encode({"insert": "c", "$db": "d"})
    checked = bytearray(_raw_msg(b"\x00" + body + b"\x00\x00\x00\x00", wire.CHECKSUM_PRESENT))
    struct.pack_into("<I", checked, len(checked) - 4, wire.crc32c(bytes(checked[:-4])))
    ns = b"d.c\x00"
    return [
        wire.op_msg({"hello": 1, "$db": "admin"}),
        wire.op_msg({"isMaster": 1, "helloOk": True, "client": client_meta,
                     "compression": ["zlib", "snappy"], "$db": "admin"}),
        wire.op_msg({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 20, "$db": "admin"},
                    flags=wire.EXHAUST_ALLOWED),
        wire.op_msg({"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 20, "$db": "admin"}),
        wire.op_msg({"ismaster": 1, "$db": "admin"}),
        hello_legacy,
        wire.op_query("admin.$cmd", {"$query": {"ismaster": 1, "forShell": 1}}),
        wire.op_query("admin.$cmd", {"query": {"isMaster": 1}, "$readPreference": {}}),
        wire.op_query("admin.$cmd", {"getLastError": 1}),
        wire.op_query("admin.$cmd", {"getPrevError": 1}),
        wire.op_query("admin.$cmd", {"resetError": 1}),
        wire.op_query("admin.$cmd", {"replSetGetStatus": 1, "forShell": True}),
        ping,
        wire.op_msg({"insert": "c", "documents": [{"_id": 1}], "$db": "d"}),
        wire.op_msg({"insert": "c", "documents": [{"_id": 2}], "writeConcern": {"w": 0},
                     "$db": "d"}, flags=wire.MORE_TO_COME),
        wire.op_msg({"getMore": Int64(5), "collection": "c", "$db": "d"},
                    flags=wire.EXHAUST_ALLOWED),
        wire.op_msg({"replSetGetStatus": 1, "$db": "admin"}),
        _raw_msg(b"\x00" + bson.encode({"insert": "c", "$db": "d"})
                 + _section1("documents", [{"_id": 3}, {"_id": 4}])),
        _raw_msg(_section1("documents", [{"_id": 5}]) + b"\x00"
                 + bson.encode({"insert": "c", "$db": "d"})),
        bytes(checked),
        wire.compress(ping, wire.COMPRESSOR_IDS["zlib"]),
        wire.compress(wire.op_msg({"hello": 1, "$db": "admin"}), wire.COMPRESSOR_IDS["noop"]),
        wire.compress(hello_legacy, wire.COMPRESSOR_IDS["zlib"]),
        wire.compress(ping, wire.COMPRESSOR_IDS["snappy"]),
        wire.compress(ping, wire.COMPRESSOR_IDS["zstd"]),
        _legacy(wire.OP_INSERT, b"\x00\x00\x00\x00" + ns + bson.encode({"_id": 6})),
        _legacy(wire.OP_UPDATE, b"\x00" * 4 + ns + b"\x00" * 4 + bson.encode({"_id": 6})
                + bson.encode({"$set": {"a": 1}})),
        _legacy(wire.OP_DELETE, b"\x00" * 4 + ns + b"\x00" * 4 + bson.encode({"_id": 6})),
        _legacy(wire.OP_KILL_CURSORS, b"\x00" * 4 + _INT32.pack(1) + struct.pack("<q", 5)),
        _legacy(wire.OP_GET_MORE, b"\x00" * 4 + ns + _INT32.pack(0) + struct.pack("<q", 5)),
        wire.op_query("d.c", {"a": 1}, flags=1 << 6),
    ]


class Mutator:
    """Turns seeds into inputs with a random.Random (hypothesis's or the script's)."""

    def __init__(self, process_id: bson.ObjectId, counter: int) -> None:
        self.process_id = process_id
        self.seeds = seed_frames(process_id, counter)
        self._ops: list[Callable[[random.Random, bytearray], None]] = [
            self._flip_bits, self._set_bytes, self._set_int32, self._truncate, self._insert,
            self._duplicate, self._splice, self._set_header_field]

    def frame(self, rng: random.Random) -> bytes:
        """One input frame: a seed rebuilt with odd values, or mutated bytes, or noise."""
        roll = rng.random()
        if roll < 0.05:
            return rng.randbytes(rng.randrange(0, 64))
        if roll < 0.45:
            data = bytearray(self._rebuilt(rng))
        else:
            data = bytearray(rng.choice(self.seeds))
            for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
                rng.choice(self._ops)(rng, data)
        if len(data) >= 4 and rng.random() < 0.85:
            _INT32.pack_into(data, 0, len(data))       # a length the reader accepts
        return bytes(data)

    def stream(self, rng: random.Random, count: int) -> bytes:
        return b"".join(self.frame(rng) for _ in range(count))

    # -- structure-aware: rebuild a seed's command document with odd values -------------
    def _rebuilt(self, rng: random.Random) -> bytes:
        seed = rng.choice(self.seeds[:12] + self.seeds[12:13] * 2)
        op = wire.opcode(seed)
        doc = wire.decode_msg_body(seed) if op == wire.OP_MSG else wire.decode_query(seed)[4]
        doc = dict(doc)
        values = _weird_values(rng, self.process_id)
        for _ in range(rng.randrange(1, 5)):
            key = rng.choice(_HELLO_FIELDS + tuple(doc))
            if rng.random() < 0.15:
                doc.pop(key, None)
            else:
                doc[key] = rng.choice(values)
        if rng.random() < 0.2:      # the command name's own value, or a non-hello first key
            first = next(iter(doc), "hello")
            doc = {first: rng.choice(values), **{k: v for k, v in doc.items() if k != first}}
        try:
            if op == wire.OP_MSG:
                out = wire.op_msg(doc, flags=rng.choice(_FLAGS) if rng.random() < 0.4
                                  else wire.msg_flags(seed))
            else:
                out = wire.op_query("admin.$cmd" if rng.random() < 0.9 else "x.$cmd", doc,
                                    flags=rng.choice((0, 0, 1 << 6, -1)))
        except (OverflowError, bson.errors.InvalidDocument, ValueError):
            return seed
        if rng.random() < 0.15:
            out = wire.compress(out, rng.choice((0, 1, 2, 3)))
        return out

    # -- byte-level ----------------------------------------------------------------------
    @staticmethod
    def _flip_bits(rng: random.Random, data: bytearray) -> None:
        for _ in range(rng.randrange(1, 9)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)

    @staticmethod
    def _set_bytes(rng: random.Random, data: bytearray) -> None:
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF, 0x0A))

    @staticmethod
    def _set_int32(rng: random.Random, data: bytearray) -> None:
        if len(data) >= 4:
            value = rng.choice(_INTERESTING_INTS + (len(data), len(data) - 16, len(data) + 1))
            _INT32.pack_into(data, rng.randrange(len(data) - 3), value - 2 ** 32
                             if value >= 2 ** 31 else value)

    @staticmethod
    def _truncate(rng: random.Random, data: bytearray) -> None:
        del data[rng.randrange(len(data) + 1):]

    @staticmethod
    def _insert(rng: random.Random, data: bytearray) -> None:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randrange(1, 16))

    @staticmethod
    def _duplicate(rng: random.Random, data: bytearray) -> None:
        if data:
            start = rng.randrange(len(data))
            chunk = data[start:start + rng.randrange(1, 64)]
            at = rng.randrange(len(data) + 1)
            data[at:at] = chunk

    def _splice(self, rng: random.Random, data: bytearray) -> None:
        other = rng.choice(self.seeds)
        at = rng.randrange(len(data) + 1)
        data[at:] = other[rng.randrange(len(other)):]

    @staticmethod
    def _set_header_field(rng: random.Random, data: bytearray) -> None:
        if len(data) >= 16:
            opcodes = (wire.OP_MSG, wire.OP_QUERY, wire.OP_COMPRESSED, wire.OP_REPLY,
                       wire.OP_INSERT, wire.OP_GET_MORE, wire.OP_KILL_CURSORS, 0, 9999)
            field = rng.randrange(3)
            value = rng.choice(opcodes) if field == 2 else rng.choice(_INTERESTING_INTS)
            _INT32.pack_into(data, 4 + 4 * field, value - 2 ** 32 if value >= 2 ** 31 else value)


# -- the pieces under test ----------------------------------------------------------------

def check_decoders(frame: bytes) -> None:
    """Run every wire decoder that may see this frame; only ProtocolError may escape."""
    calls: list[Callable[[bytes], Any]] = [
        wire.command_name, wire.check_msg_flags, wire.decode_msg_body, wire.decode_query,
        wire.decode_reply, wire.reply_document, wire.expects_reply, wire.more_to_come,
        wire.msg_body_offset, wire.decompress, wire.iter_frames]
    for call in calls:
        try:
            result = call(frame)
            if call is wire.iter_frames:
                list(result)
        except ProtocolError:
            pass
        except Exception as exc:
            raise FuzzFailure(f"wire.{call.__name__} raised {type(exc).__name__}: {exc}; "
                              f"frame {frame!r}") from exc


def split_points(rng: random.Random, size: int) -> list[int]:
    """Where to cut a byte stream into the pieces a client writes."""
    cuts = sorted({rng.randrange(1, size) for _ in range(rng.randrange(0, 6))} if size > 1
                  else set())
    return cuts + [size]


class FakeServer:
    """Server connections for the pools: socketpairs answered by daemon threads.

    Every request that expects a reply gets {ok: 1}; an exhaust getMore gets two replies
    (the first with moreToCome); a legacy query gets an OP_REPLY.
    """

    def __init__(self) -> None:
        self.open = 0
        self._lock = threading.Lock()

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.settimeout(MESSAGE_TIMEOUT)
        with self._lock:
            self.open += 1
        threading.Thread(target=self._serve, args=(theirs,), daemon=True).start()
        return ours

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                try:
                    frame = wire.read_frame(sock)
                except (ConnectionFailure, ProtocolError):
                    return
                for reply in self._replies(frame):
                    sock.sendall(reply)
        except OSError:
            return
        finally:
            sock.close()
            with self._lock:
                self.open -= 1

    @staticmethod
    def _replies(frame: bytes) -> list[bytes]:
        op, req = wire.opcode(frame), wire.request_id(frame)
        if op == wire.OP_MSG:
            flags = wire.msg_flags(frame)
            if flags & wire.MORE_TO_COME:
                return []
            if flags & wire.EXHAUST_ALLOWED:
                first = wire.op_msg({"ok": 1.0, "cursor": {"id": Int64(5), "ns": "d.c",
                                                           "nextBatch": [{}]}},
                                    resp_to=req, flags=wire.MORE_TO_COME)
                last = wire.op_msg({"ok": 1.0, "cursor": {"id": Int64(0), "ns": "d.c",
                                                          "nextBatch": []}},
                                   resp_to=wire.request_id(first))
                return [first, last]
            return [wire.op_msg({"ok": 1.0, "n": 0}, resp_to=req)]
        if op in (wire.OP_QUERY, wire.OP_GET_MORE):
            return [wire.op_reply([{"ok": 1.0, "err": None, "n": 0}], resp_to=req)]
        return []


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _hello_doc(real: str, wire_version: int) -> dict[str, Any]:
    return {"ok": 1.0, "isWritablePrimary": True, "setName": "rs", "setVersion": 1,
            "hosts": [MODERN, LEGACY], "primary": MODERN, "me": real,
            "maxWireVersion": wire_version, "minWireVersion": 0,
            "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
            "maxWriteBatchSize": 100000, "logicalSessionTimeoutMinutes": 30}


class FuzzFailure(AssertionError):
    """An input broke an invariant; the message says which and shows the input."""


class RelayHarness:
    """A real Relay over a fake two-member topology (a modern and a 2.4-era member)."""

    def __init__(self) -> None:
        self.settings = parse_args(
            ["--addrs", MODERN, "--message-timeout", f"{MESSAGE_TIMEOUT}s",
             "--pool-wait-timeout", f"{MESSAGE_TIMEOUT}s", "--max-connections", "2",
             "--get-last-error-timeout", "1s"], env={})
        self.server = FakeServer()
        self.topology = Topology("rs")
        metrics = Metrics()
        self.members: list[Member] = []
        for port, real in enumerate((MODERN, LEGACY), start=6000):
            pool = Pool(real, self.server.connect, 2)
            member = Member(real, f"127.0.0.1:{port}", port, pool, metrics.member(real))
            self.topology.add(member)
            self.members.append(member)
        for member, version in zip(self.members, (17, 0)):
            self.topology.update(member, _hello_doc(member.real, version))
        self.mutator = Mutator(self.topology.process_id, self.members[0].counter)
        self._verdicts: list[tuple[Verdict, Optional[ParkedHello]]] = []
        self.io = ClientIO(Budget(1 << 30), MESSAGE_TIMEOUT)
        self.relay = Relay(self.settings, self.topology, self._handback,
                           on_server_failure=lambda m: None,
                           on_state_change=lambda m, s: None)
        self._records = _Records()
        self._logger = logging.getLogger("dvara")
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._records)
        self._logger.propagate = False      # expected warnings stay quiet
        self._peers: dict[ClientConn, socket.socket] = {}
        self.inputs = 0
        self.frames = 0
        self.verdicts = {Verdict.RESUME: 0, Verdict.PARK: 0, Verdict.CLOSE: 0}
        self.reader_errors = 0
        self.baseline_fds = _open_fds()

    def _handback(self, client: ClientConn, verdict: Verdict,
                  parked: Optional[ParkedHello]) -> None:
        self._verdicts.append((verdict, parked))

    # -- clients ------------------------------------------------------------------------
    def new_client(self, member: Optional[Member] = None) -> ClientConn:
        ours, theirs = socket.socketpair()
        theirs.settimeout(MESSAGE_TIMEOUT)
        client = ClientConn(ours, ("127.0.0.1", 50000), member or self.members[0], self.io)
        self._peers[client] = theirs
        return client

    def close_client(self, client: ClientConn) -> None:
        """What the acceptor does when it closes a client."""
        if client.pinned is not None:
            self.relay.release_pin(client, reusable=not client.buf)
        client.parked = None
        client.close()
        self._peers.pop(client).close()

    # -- one input ---------------------------------------------------------------------
    def run_input(self, rng: random.Random, frames: int = 3) -> None:
        """Write a stream of fuzzed frames in pieces to one client; serve what it yields."""
        self.inputs += 1
        data = self.mutator.stream(rng, frames)
        client = self.new_client(rng.choice(self.members))
        try:
            self._feed(client, data, split_points(rng, len(data)) if data else [])
        finally:
            if client in self._peers:
                self.close_client(client)
        self.check_settled()

    def _feed(self, client: ClientConn, data: bytes, cuts: list[int]) -> None:
        peer, sent, received = self._peers[client], 0, 0
        expected = _reference_frames(data)
        got: list[bytes] = []
        for cut in cuts:
            peer.sendall(data[sent:cut])
            sent = cut
            for _ in range(100):
                if received >= sent:
                    break
                before = len(client.buf)
                if client.fill() is Fill.CLOSED:
                    raise FuzzFailure(f"fill() saw EOF on an open socket; input {data!r}")
                received += len(client.buf) - before
            else:
                raise FuzzFailure(f"fill() did not read what was sent; input {data!r}")
            while True:
                try:
                    frame = client.next_frame()
                except ProtocolError:
                    self.reader_errors += 1
                    _expect_reader_error(expected, got, data[:sent])
                    return
                if frame is None:
                    break
                got.append(frame)
                _expect_frame(expected, got, data)
                check_decoders(frame)
                if self.serve(client, frame) is Verdict.CLOSE:
                    return
        stopped = expected.error_at is not None and expected.error_at + 4 <= len(data)
        if len(got) != len(expected.frames) or stopped:
            raise FuzzFailure(f"reader gave {len(got)} frames, expected {expected}; {data!r}")

    def serve(self, client: ClientConn, frame: bytes) -> Verdict:
        """Relay.serve as the acceptor runs it, plus the checks. Returns the verdict."""
        self.frames += 1
        start = time.monotonic()
        self._verdicts.clear()
        rest = bytes(client.buf)    # served one by one here, not by the relay's own loop
        client.buf.clear()
        client.take()
        self.relay.serve(client, frame)
        client.buf[:0] = rest
        verdict, parked = self._one_verdict(client, frame)
        answered = {wire.request_id(frame)}
        for _ in range(3):                      # parked hellos: answer as the acceptor would
            if verdict is not Verdict.PARK:
                break
            if parked is None or not math.isfinite(parked.deadline):
                raise FuzzFailure(f"PARK without a parked hello due at a finite time "
                                  f"({parked and parked.deadline}); frame {frame!r}")
            answered.add(wire.request_id(parked.frame))
            client.take()
            self.relay.serve_parked(client, parked)
            verdict, parked = self._one_verdict(client, frame)
        client.busy = False
        took = time.monotonic() - start
        self.verdicts[verdict] += 1
        if took > SERVE_LIMIT:
            raise FuzzFailure(f"serve took {took:.2f}s; frame {frame!r}")
        self._check_replies(client, frame, answered)
        self._check_log(frame)
        if verdict is Verdict.CLOSE:
            self.close_client(client)
        return verdict

    def _one_verdict(self, client: ClientConn,
                     frame: bytes) -> tuple[Verdict, Optional[ParkedHello]]:
        """The verdict of one serve: handed back once, or let go (RESUME) with none."""
        if not self._verdicts:
            if client.busy:
                raise FuzzFailure(f"serve neither handed back nor let go; frame {frame!r}")
            return Verdict.RESUME, None
        if len(self._verdicts) != 1 or client.busy is not True:
            raise FuzzFailure(f"handback called {self._verdicts} (busy {client.busy}); "
                              f"frame {frame!r}")
        return self._verdicts.pop()

    def _check_replies(self, client: ClientConn, frame: bytes, answered: set[int]) -> None:
        peer = self._peers.get(client)
        if peer is None:
            return
        data = _read_available(peer)
        try:
            replies = list(wire.iter_frames(data))
        except ProtocolError as exc:
            raise FuzzFailure(f"bad reply framing ({exc}); frame {frame!r}") from exc
        if sum(map(len, replies)) != len(data):
            raise FuzzFailure(f"a partial reply was sent; frame {frame!r}")
        for reply in replies:
            if wire.opcode(reply) == wire.OP_COMPRESSED:
                reply = wire.decompress(reply)[0]
            if wire.response_to(reply) not in answered:
                raise FuzzFailure(f"reply answers {wire.response_to(reply)}, not one of "
                                  f"{answered}; frame {frame!r}")
            answered.add(wire.request_id(reply))
            wire.reply_document(reply)

    def _check_log(self, frame: bytes) -> None:
        if self._records.records:
            record = self._records.records[0]
            self._records.records.clear()
            detail = logging.Formatter().format(record)
            raise FuzzFailure(f"dvara logged an error: {detail}\nframe {frame!r}")

    # -- between inputs ------------------------------------------------------------------
    def check_settled(self) -> None:
        for member in self.members:
            if member.pool.in_use:
                raise FuzzFailure(f"{member.pool.in_use} connection(s) still checked out")

    def check_bystander(self) -> None:
        """A well-behaved client on each member is answered correctly."""
        for member in self.members:
            client = self.new_client(member)
            frames = [wire.op_msg({"hello": 1, "$db": "admin"}),
                      wire.op_query("admin.$cmd", {"isMaster": 1})]
            if member.max_wire_version >= 6:
                frames.append(wire.op_msg({"ping": 1, "$db": "admin"}))
            for frame in frames:
                if self.serve(client, frame) is not Verdict.RESUME:
                    raise FuzzFailure(f"a well-behaved client was closed ({frame!r})")
            self.close_client(client)
        self.check_settled()

    def check_no_leak(self, timeout: float = 5.0) -> None:
        """Every socket is closed again once the pools are closed (fake server included)."""
        for member in self.members:
            member.pool.close()
        deadline = time.monotonic() + timeout
        while _open_fds() > self.baseline_fds or self.server.open:
            if time.monotonic() > deadline:
                raise FuzzFailure(f"{_open_fds() - self.baseline_fds} socket(s) leaked, "
                                  f"{self.server.open} fake server connection(s) open")
            time.sleep(0.01)

    def close(self) -> None:
        for client in list(self._peers):
            self.close_client(client)
        for member in self.members:
            member.pool.close()
        self._logger.removeHandler(self._records)
        self._logger.propagate = self._propagate


# -- the reference frame splitter ----------------------------------------------------------

class _Expected:
    def __init__(self, frames: list[bytes], error_at: Optional[int]) -> None:
        self.frames = frames
        self.error_at = error_at

    def __repr__(self) -> str:
        return f"<{len(self.frames)} frames, bad length at {self.error_at}>"


def _reference_frames(data: bytes) -> _Expected:
    """The frames a correct reader yields from data, and where a bad length stops it."""
    frames, pos = [], 0
    while pos + 4 <= len(data):
        length = _INT32.unpack_from(data, pos)[0]
        if length < wire.MIN_MESSAGE_SIZE or length > wire.MAX_MESSAGE_SIZE:
            return _Expected(frames, pos)
        if pos + length > len(data):
            break
        frames.append(data[pos:pos + length])
        pos += length
    return _Expected(frames, None)


def _expect_frame(expected: _Expected, got: list[bytes], data: bytes) -> None:
    index = len(got) - 1
    if index >= len(expected.frames) or expected.frames[index] != got[index]:
        raise FuzzFailure(f"reader frame {index} differs from the reference; input {data!r}")


def _expect_reader_error(expected: _Expected, got: list[bytes], sent: bytes) -> None:
    if expected.error_at is None or len(got) != len(expected.frames) \
            or expected.error_at + 4 > len(sent):
        raise FuzzFailure(f"reader raised ProtocolError early ({expected}); input {sent!r}")


def _read_available(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    chunks = []
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except (BlockingIOError, InterruptedError):
        pass
    finally:
        sock.settimeout(MESSAGE_TIMEOUT)
    return b"".join(chunks)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- live: random frames at a dvara process -------------------------------------------------

class LiveStats:
    def __init__(self) -> None:
        self.frames = 0
        self.connects = 0
        self.closed_by_proxy = 0
        self.replies = 0
        self.lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def __repr__(self) -> str:
        return (f"{self.frames} frames on {self.connects} connections, {self.replies} reply "
                f"bytes read, {self.closed_by_proxy} connections closed by the proxy")


def throw_frames(port: int, mutator: Mutator, seed: int, frames: int, connections: int,
                 deadline: float) -> LiveStats:
    """Send `frames` fuzzed frames to 127.0.0.1:port from `connections` threads."""
    stats = LiveStats()
    per_thread = max(1, frames // connections)
    threads = [threading.Thread(target=_throw, args=(port, mutator, random.Random(seed + i),
                                                     per_thread, deadline, stats), daemon=True)
               for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 10)
    return stats


def _throw(port: int, mutator: Mutator, rng: random.Random, frames: int, deadline: float,
           stats: LiveStats) -> None:
    sock: Optional[socket.socket] = None
    sent_on_sock = 0
    for _ in range(frames):
        if time.monotonic() > deadline:
            break
        if sock is None or sent_on_sock >= rng.randrange(1, 40):
            if sock is not None:
                sock.close()
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sent_on_sock = 0
            stats.add(connects=1)
        frame = mutator.frame(rng)
        try:
            if rng.random() < 0.03:          # half a message, then gone
                sock.sendall(frame[:len(frame) // 2])
                sock.close()
                sock = None
            else:
                sock.sendall(frame)
        except OSError:
            sock.close()
            sock = None
            stats.add(closed_by_proxy=1)
        stats.add(frames=1)
        sent_on_sock += 1
        if sock is not None and not _read_some(sock, stats, rng.choice((0.0, 0.005, 0.03))):
            sock.close()
            sock = None
            stats.add(closed_by_proxy=1)
    if sock is not None:
        sock.close()


def _read_some(sock: socket.socket, stats: LiveStats, wait: float) -> bool:
    """Read what the proxy sent within wait seconds; False once it has closed."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return True
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return False
            stats.add(replies=len(data))
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
