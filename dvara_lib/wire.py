"""MongoDB wire-protocol framing: headers, opcodes, minimal inspection, message builders.

Frames travel through dvara as ``bytes`` holding the whole message, header included.
Only what the proxy must see is ever decoded: the header, OP_MSG flag bits, the first
key of a command document (to spot hello, replSetGetStatus and friends), and, for the
few messages the proxy answers or rewrites itself, the command document.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import zlib
from typing import Any, Iterator, Optional

import bson
import crc32c as _crc32c

from dvara_lib.errors import ConnectionFailure, ProtocolError, ServerTimeout

# The optional compression libraries pymongo uses (extra "compression"); without one,
# its compressor is not offered.
try:
    import snappy as SNAPPY
except ImportError:  # pragma: no cover - depends on the installation
    SNAPPY = None
try:
    import zstandard as ZSTD
except ImportError:  # pragma: no cover - depends on the installation
    ZSTD = None

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMPRESSED = 2012
OP_MSG = 2013

#: Legacy opcodes that never get a reply.
NO_REPLY_OPCODES = frozenset({OP_UPDATE, OP_INSERT, OP_DELETE, OP_KILL_CURSORS})
#: Legacy opcodes whose only reply is an OP_REPLY.
REPLY_OPCODES = frozenset({OP_QUERY, OP_GET_MORE})
KNOWN_REQUEST_OPCODES = NO_REPLY_OPCODES | REPLY_OPCODES | {OP_MSG, OP_COMPRESSED}

#: Wire version from which a server speaks OP_MSG (MongoDB 3.6).
OP_MSG_WIRE_VERSION = 6

MIN_MESSAGE_SIZE = 16
MAX_MESSAGE_SIZE = 48_000_000

HEADER = struct.Struct("<iiii")
INT32 = struct.Struct("<i")
#: How much one recv asks for (larger buffers cost an mmap/munmap per recv).
READ_CHUNK = 64 * 1024
_UINT32 = struct.Struct("<I")
_REPLY_PREFIX = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned
_COMPRESSED_PREFIX = struct.Struct("<iiB")  # originalOpcode, uncompressedSize, compressorId

# OP_MSG flag bits (OP_MSG spec).
CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
_KNOWN_FLAGS = CHECKSUM_PRESENT | MORE_TO_COME | EXHAUST_ALLOWED
_REQUIRED_MASK = 0xFFFF

# OP_REPLY flag bits.
REPLY_CURSOR_NOT_FOUND = 1 << 0
REPLY_QUERY_FAILURE = 1 << 1

# OP_COMPRESSED compressor ids (OP_COMPRESSED spec).
COMPRESSOR_IDS = {"noop": 0, "snappy": 1, "zlib": 2, "zstd": 3}
#: The library each compressor needs (zlib is in the standard library).
COMPRESSOR_PACKAGES = {"snappy": "python-snappy", "zstd": "zstandard"}
#: What this proxy can decode, in its order of preference.
SUPPORTED_COMPRESSORS = tuple(name for name, lib in (("snappy", SNAPPY), ("zstd", ZSTD),
                                                     ("zlib", zlib)) if lib is not None)
#: Commands never sent compressed (OP_COMPRESSED spec).
UNCOMPRESSED_COMMANDS = frozenset((
    "hello", "isMaster", "ismaster", "saslStart", "saslContinue", "getnonce", "authenticate",
    "createUser", "updateUser", "copydbSaslStart", "copydbgetnonce", "copydb"))
#: zlib's level (fast; the same as before snappy and zstd came).
_ZLIB_LEVEL = 1

def next_request_id() -> int:
    """A request id for a message the proxy builds itself: random, as pymongo's are (a
    server only echoes it in responseTo, and each connection has one request in
    flight)."""
    return random.randrange(1, 1 << 31)


def check_length(length: int) -> None:
    """Reject a header length outside [16, 48,000,000]. Can raise ProtocolError."""
    if length < MIN_MESSAGE_SIZE or length > MAX_MESSAGE_SIZE:
        raise ProtocolError(
            f"message length {length} outside [{MIN_MESSAGE_SIZE}, {MAX_MESSAGE_SIZE}]")


def opcode(frame: bytes) -> int:
    return INT32.unpack_from(frame, 12)[0]


def request_id(frame: bytes) -> int:
    return INT32.unpack_from(frame, 4)[0]


def response_to(frame: bytes) -> int:
    return INT32.unpack_from(frame, 8)[0]


def msg_flags(frame: bytes) -> int:
    """The flagBits of an OP_MSG frame. Can raise ProtocolError."""
    if len(frame) < 20:
        raise ProtocolError("truncated OP_MSG: no flagBits")
    return _UINT32.unpack_from(frame, 16)[0]


def more_to_come(frame: bytes) -> bool:
    """True for an OP_MSG whose sender will not wait for (or will send more of) a reply."""
    return opcode(frame) == OP_MSG and bool(msg_flags(frame) & MORE_TO_COME)


def expects_reply(frame: bytes) -> bool:
    """Whether the server answers this (uncompressed) request."""
    op = opcode(frame)
    if op == OP_MSG:
        return not msg_flags(frame) & MORE_TO_COME
    return op in REPLY_OPCODES


# --- reading whole frames from a blocking socket (server side) -----------------------

def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each read and write of a blocking socket by seconds.

    A plain socket is put in blocking mode with the kernel's SO_RCVTIMEO/SO_SNDTIMEO, so
    that no poll() precedes each recv/send (a timed-out call raises BlockingIOError); a TLS
    socket keeps Python's own timeout.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))


def set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each blocking read of a plain socket by seconds (SO_RCVTIMEO)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill view from sock. Can raise ConnectionFailure or ServerTimeout."""
    got, n = 0, len(view)
    while got < n:
        try:
            chunk = sock.recv_into(view[got:], n - got)
        except OSError as exc:
            raise read_error(exc) from exc
        if chunk == 0:
            raise ConnectionFailure("connection closed by server")
        got += chunk


def recv_some(sock: socket.socket, n: int) -> bytes:
    """Read at least one and at most n bytes. Can raise ConnectionFailure or ServerTimeout."""
    try:
        data = sock.recv(n)
    except OSError as exc:
        raise read_error(exc) from exc
    if not data:
        raise ConnectionFailure("connection closed by server")
    return data


def read_error(exc: OSError) -> Exception:
    """What a failed read from a server raises (ServerTimeout or ConnectionFailure)."""
    if isinstance(exc, (socket.timeout, BlockingIOError)):
        return ServerTimeout("timed out reading from server")
    return ConnectionFailure(f"read failed: {exc}")


def write_error(exc: OSError) -> Exception:
    """What a failed write to a server raises (ServerTimeout or ConnectionFailure)."""
    if isinstance(exc, (socket.timeout, BlockingIOError)):
        return ServerTimeout("timed out writing to server")
    return ConnectionFailure(f"write failed: {exc}")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes. Can raise ConnectionFailure or ServerTimeout."""
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def read_frame(sock: socket.socket) -> bytes:
    """Read one whole message (header included), copying its body once.

    Can raise ConnectionFailure, ServerTimeout or ProtocolError.
    """
    header = recv_exact(sock, 16)
    length = INT32.unpack_from(header, 0)[0]
    check_length(length)
    frame = bytearray(length)
    frame[:16] = header
    with memoryview(frame) as view:
        _recv_into(sock, view[16:])
    return bytes(frame)


def round_trip(sock: socket.socket, request: bytes) -> dict[str, Any]:
    """Send a request the proxy built and return its reply's document.

    Can raise ConnectionFailure, ServerTimeout or ProtocolError.
    """
    send_all(sock, request)
    reply = read_frame(sock)
    if response_to(reply) != request_id(request):
        raise ProtocolError(f"reply answers request {response_to(reply)}, "
                            f"not {request_id(request)}")
    return reply_document(reply)


def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of data. Can raise ConnectionFailure or ServerTimeout."""
    try:
        sock.sendall(data)
    except OSError as exc:
        raise write_error(exc) from exc


# --- cheap inspection ------------------------------------------------------------------

def _cstring_end(data: bytes, start: int) -> int:
    end = data.find(b"\x00", start)
    if end < 0:
        raise ProtocolError("unterminated cstring")
    return end


def _first_key(data: bytes, doc_start: int) -> str:
    """The first key of the BSON document at doc_start, without decoding the document."""
    if doc_start + 5 > len(data):
        raise ProtocolError("truncated document")
    if data[doc_start + 4] == 0:
        return ""
    key_end = _cstring_end(data, doc_start + 5)
    return data[doc_start + 5:key_end].decode("utf-8", "replace")


def msg_body_offset(frame: bytes) -> int:
    """Offset of the kind-0 body document of an OP_MSG. Can raise ProtocolError."""
    end = len(frame) - (4 if msg_flags(frame) & CHECKSUM_PRESENT else 0)
    pos = 20
    while pos < end:
        kind = frame[pos]
        if kind == 0:
            return pos + 1
        if kind != 1:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
        if pos + 5 > len(frame):
            raise ProtocolError("truncated OP_MSG section")
        size = INT32.unpack_from(frame, pos + 1)[0]
        if size < 5:
            raise ProtocolError("bad OP_MSG section size")
        pos += 1 + size
    raise ProtocolError("OP_MSG has no body section")


def query_doc_offset(frame: bytes) -> tuple[str, int]:
    """(fullCollectionName, query document offset) of an OP_QUERY frame."""
    ns_end = _cstring_end(frame, 20)
    return frame[20:ns_end].decode("utf-8", "replace"), ns_end + 1 + 8


def command_name(frame: bytes) -> Optional[str]:
    """The command name of an OP_MSG, or of an OP_QUERY on ``db.$cmd``; else None."""
    op = opcode(frame)
    if op == OP_MSG:
        if len(frame) > 26 and frame[20] == 0:    # the usual layout: the body comes first
            if frame[25] == 0:
                return ""
            end = frame.find(b"\x00", 26)
            if end > 0:
                return frame[26:end].decode("utf-8", "replace")
        return _first_key(frame, msg_body_offset(frame))
    if op == OP_QUERY:
        ns, offset = query_doc_offset(frame)
        if ns.endswith(".$cmd"):
            name = _first_key(frame, offset)
            if name in ("$query", "query"):
                return next(iter(decode_query(frame)[4]), None)
            return name
    return None


def check_msg_flags(frame: bytes) -> bytes:
    """Validate an OP_MSG's flags; clear unknown optional bits (keeping a checksum valid).

    Can raise ProtocolError for an unknown required bit.
    """
    flags = msg_flags(frame)
    unknown = flags & ~_KNOWN_FLAGS
    if not unknown:
        return frame
    if unknown & _REQUIRED_MASK:
        raise ProtocolError(f"OP_MSG has unknown required flag bits {unknown:#x}")
    flags &= ~unknown
    out = bytearray(frame)
    _UINT32.pack_into(out, 16, flags)
    if flags & CHECKSUM_PRESENT:
        _UINT32.pack_into(out, len(out) - 4, crc32c(bytes(out[:-4])))
    return bytes(out)


# --- decoding the few messages the proxy must read -------------------------------------

def decode_msg_body(frame: bytes) -> dict[str, Any]:
    """The kind-0 body of an OP_MSG as a dict. Can raise ProtocolError."""
    offset = msg_body_offset(frame)
    try:
        size = INT32.unpack_from(frame, offset)[0]
        return bson.decode(frame[offset:offset + size])
    except Exception as exc:
        raise ProtocolError(f"bad OP_MSG body: {exc}") from exc


def decode_query(frame: bytes) -> tuple[int, str, int, int, dict[str, Any]]:
    """(flags, ns, numberToSkip, numberToReturn, query) of an OP_QUERY frame.

    Can raise ProtocolError.
    """
    ns, offset = query_doc_offset(frame)
    if offset + 5 > len(frame):
        raise ProtocolError("truncated OP_QUERY")
    flags = INT32.unpack_from(frame, 16)[0]
    skip, nret = struct.unpack_from("<ii", frame, offset - 8)
    try:
        size = INT32.unpack_from(frame, offset)[0]
        doc = bson.decode(frame[offset:offset + size])
    except Exception as exc:
        raise ProtocolError(f"bad OP_QUERY document: {exc}") from exc
    if len(doc) and next(iter(doc)) in ("$query", "query") and isinstance(
            doc.get("$query", doc.get("query")), dict):
        doc = doc.get("$query", doc.get("query"))
    return flags, ns, skip, nret, doc


def decode_reply(frame: bytes) -> tuple[int, int, int, list[dict[str, Any]]]:
    """(responseFlags, cursorID, startingFrom, documents) of an OP_REPLY frame.

    Can raise ProtocolError.
    """
    if len(frame) < 36:
        raise ProtocolError("truncated OP_REPLY")
    flags, cursor_id, starting, count = _REPLY_PREFIX.unpack_from(frame, 16)
    try:
        docs = bson.decode_all(frame[36:])
    except Exception as exc:
        raise ProtocolError(f"bad OP_REPLY documents: {exc}") from exc
    if len(docs) != count:
        raise ProtocolError(f"OP_REPLY says {count} documents, holds {len(docs)}")
    return flags, cursor_id, starting, docs


def reply_document(frame: bytes) -> dict[str, Any]:
    """The (first) document of an OP_MSG or OP_REPLY reply."""
    if opcode(frame) == OP_MSG:
        return decode_msg_body(frame)
    docs = decode_reply(frame)[3]
    if not docs:
        raise ProtocolError("OP_REPLY holds no document")
    return docs[0]


# --- building messages -----------------------------------------------------------------

def _frame(op: int, body: bytes, req_id: int, resp_to: int) -> bytes:
    return HEADER.pack(16 + len(body), req_id, resp_to, op) + body


def op_msg(doc: dict[str, Any], resp_to: int = 0, flags: int = 0,
           req_id: Optional[int] = None) -> bytes:
    """An OP_MSG with one kind-0 body section."""
    body = _UINT32.pack(flags) + b"\x00" + bson.encode(doc)
    return _frame(OP_MSG, body, next_request_id() if req_id is None else req_id, resp_to)


def op_reply(docs: list[dict[str, Any]], resp_to: int, flags: int = 0,
             cursor_id: int = 0, starting: int = 0) -> bytes:
    """An OP_REPLY carrying docs."""
    payload = b"".join(bson.encode(d) for d in docs)
    body = _REPLY_PREFIX.pack(flags, cursor_id, starting, len(docs)) + payload
    return _frame(OP_REPLY, body, next_request_id(), resp_to)


def op_query(ns: str, doc: dict[str, Any], number_to_return: int = -1, flags: int = 0,
             req_id: Optional[int] = None) -> bytes:
    """An OP_QUERY (legacy command when ns is ``db.$cmd``)."""
    body = (INT32.pack(flags) + ns.encode() + b"\x00"
            + struct.pack("<ii", 0, number_to_return) + bson.encode(doc))
    return _frame(OP_QUERY, body, next_request_id() if req_id is None else req_id, 0)


def command(doc: dict[str, Any], db: str, max_wire_version: int) -> bytes:
    """A command the proxy sends on its own connection: OP_MSG to a server that speaks
    it (3.6+), legacy OP_QUERY on db.$cmd otherwise."""
    if max_wire_version >= OP_MSG_WIRE_VERSION:
        return op_msg({**doc, "$db": db})
    return op_query(f"{db}.$cmd", doc)


def reply_like(request: bytes, doc: dict[str, Any], flags: int = 0) -> bytes:
    """A one-document reply in the protocol of request (OP_MSG or OP_REPLY)."""
    if opcode(request) == OP_MSG:
        return op_msg(doc, resp_to=request_id(request), flags=flags)
    return op_reply([doc], resp_to=request_id(request), flags=flags)


def with_request_id(frame: bytes, req_id: int) -> bytes:
    """A copy of frame carrying another requestID."""
    out = bytearray(frame)
    INT32.pack_into(out, 4, req_id)
    return bytes(out)


# --- OP_COMPRESSED ---------------------------------------------------------------------
# Every decompressor knows the size the header claims (already bounded by the largest
# message) and never makes more than that: a decompression bomb fails before it grows.

def decompress(frame: bytes) -> tuple[bytes, int]:
    """(original frame, compressor id) of an OP_COMPRESSED frame. Can raise ProtocolError."""
    if len(frame) < 25:
        raise ProtocolError("truncated OP_COMPRESSED")
    original_op, size, compressor = _COMPRESSED_PREFIX.unpack_from(frame, 16)
    check_length(size + 16)
    if original_op == OP_COMPRESSED:
        raise ProtocolError("nested OP_COMPRESSED")
    decoder = _DECOMPRESSORS.get(compressor)
    if decoder is None:
        raise ProtocolError(f"unsupported compressor id {compressor}")
    data = decoder(memoryview(frame)[25:], size)
    if len(data) != size:
        raise ProtocolError(f"OP_COMPRESSED says {size} bytes, holds {len(data)}")
    return HEADER.pack(16 + size, request_id(frame), response_to(frame), original_op) + data, compressor


def _noop_decompress(data: memoryview, size: int) -> bytes:
    return bytes(data)


def _zlib_decompress(data: memoryview, size: int) -> bytes:
    try:
        return zlib.decompressobj().decompress(data, size + 1)
    except zlib.error as exc:
        raise ProtocolError(f"bad zlib data: {exc}") from exc


def snappy_length(data: memoryview) -> int:
    """The uncompressed length a raw snappy block starts with (a little-endian base-128
    varint of at most 32 bits). Can raise ProtocolError."""
    length = 0
    for i in range(min(len(data), 5)):
        length |= (data[i] & 0x7F) << (7 * i)
        if not data[i] & 0x80:
            return length
    raise ProtocolError("bad snappy data: no length header")


def _snappy_decompress(data: memoryview, size: int) -> bytes:
    claimed = snappy_length(data)
    if claimed != size:
        raise ProtocolError(f"OP_COMPRESSED says {size} bytes, its snappy data {claimed}")
    try:
        return SNAPPY.uncompress(data)
    except Exception as exc:    # the library's own errors (UncompressError, cramjam's)
        raise ProtocolError(f"bad snappy data: {exc}") from exc


def _zstd_decompress(data: memoryview, size: int) -> bytes:
    try:
        claimed = ZSTD.frame_content_size(data)
        if claimed not in (-1, size):       # -1: the frame does not say
            raise ProtocolError(f"OP_COMPRESSED says {size} bytes, its zstd frame {claimed}")
        return ZSTD.ZstdDecompressor().decompress(data, max_output_size=size,
                                                  allow_extra_data=False)
    except ZSTD.ZstdError as exc:
        raise ProtocolError(f"bad zstd data: {exc}") from exc


#: compressor id -> its decoder, for noop and the compressors whose library is here.
_DECOMPRESSORS = {COMPRESSOR_IDS[name]: decoder for name, decoder in (
    ("noop", _noop_decompress), ("zlib", _zlib_decompress),
    ("snappy", _snappy_decompress), ("zstd", _zstd_decompress))
    if name == "noop" or name in SUPPORTED_COMPRESSORS}


def compress(frame: bytes, compressor: int) -> bytes:
    """frame wrapped in OP_COMPRESSED with the given compressor id (one of
    SUPPORTED_COMPRESSORS, or noop)."""
    payload = frame[16:]
    if compressor == COMPRESSOR_IDS["zlib"]:
        payload = zlib.compress(payload, _ZLIB_LEVEL)
    elif compressor == COMPRESSOR_IDS["snappy"]:
        payload = SNAPPY.compress(payload)
    elif compressor == COMPRESSOR_IDS["zstd"]:
        payload = ZSTD.ZstdCompressor().compress(payload)
    elif compressor != COMPRESSOR_IDS["noop"]:
        raise ValueError(f"unknown compressor id {compressor}")
    prefix = _COMPRESSED_PREFIX.pack(opcode(frame), len(frame) - 16, compressor)
    return _frame(OP_COMPRESSED, prefix + payload, request_id(frame), response_to(frame))


# --- CRC-32C (Castagnoli), for OP_MSG checksums ----------------------------------------

def crc32c(data: bytes) -> int:
    """CRC-32C of data (the ``crc32c`` package: SSE 4.2 / ARMv8 CRC where the CPU has it)."""
    return _crc32c.crc32c(data)


def iter_frames(data: bytes) -> Iterator[bytes]:
    """Split a buffer holding whole frames back to back (for tests and captures)."""
    pos = 0
    while pos + 4 <= len(data):
        length = INT32.unpack_from(data, pos)[0]
        check_length(length)
        yield data[pos:pos + length]
        pos += length
