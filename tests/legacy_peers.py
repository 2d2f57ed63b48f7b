"""A 2.4-era mongod (mockupdb, scripted) and a pre-2.6 client (raw frames), for the legacy tests.

``Mongod24`` keeps the last error per server connection exactly as mongod 2.4's LastError
does (nPrev, disableForCommand, forShell, killCursors) and records the server connection
every request arrived on. ``LegacyClient`` is a driver from before MongoDB 2.6 in a few
lines of struct and bson: OP_INSERT/UPDATE/DELETE, OP_QUERY (commands on db.$cmd),
OP_GET_MORE, OP_KILL_CURSORS, and OP_REPLY parsing.
"""

from __future__ import annotations

import datetime
import itertools
import socket
import struct
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import bson
from mockupdb import (Command, MockupDB, OpDelete, OpGetMore, OpInsert, OpKillCursors,
                      OpMsg, OpUpdate)

from dvara_lib import wire
from dvara_lib.proxy import legacy

OP_REPLY, OP_UPDATE, OP_INSERT, OP_QUERY, OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS = (
    1, 2001, 2002, 2004, 2005, 2006, 2007)
CURSOR_NOT_FOUND, QUERY_FAILURE = 1, 2
EXHAUST = 1 << 6
DUP_KEY = "E11000 duplicate key error index: test.c.$_id_  dup key: { : 1 }"
BAD_QUERY = "invalid operator: $bogus"
UTC = datetime.timezone.utc

_HEADER = struct.Struct("<iiii")
_REPLY_PREFIX = struct.Struct("<iqii")


# -- a pre-2.6 client ---------------------------------------------------------------------------

class Reply(NamedTuple):
    flags: int
    cursor_id: int
    starting_from: int
    docs: list[dict[str, Any]]
    response_to: int


def _cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def _int32(value: int) -> bytes:
    return struct.pack("<i", value)


def _insert_body(docs: list[dict[str, Any]], ns: str) -> bytes:
    return _int32(0) + _cstring(ns) + b"".join(bson.encode(d) for d in docs)


class LegacyClient:
    """A driver from before MongoDB 2.6, over a plain socket."""

    _ids = itertools.count(1000)

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, opcode: int, body: bytes) -> int:
        request_id = next(self._ids)
        self.sock.sendall(_HEADER.pack(16 + len(body), request_id, 0, opcode) + body)
        return request_id

    def insert(self, docs: list[dict[str, Any]], ns: str = "test.c") -> None:
        self.send(OP_INSERT, _insert_body(docs, ns))

    def insert_stream(self, tag: str, count: int, ns: str = "test.c") -> None:
        """count one-document OP_INSERTs in one go, as a w:0 bulk load sends them."""
        frames = b"".join(_HEADER.pack(16 + len(body), next(self._ids), 0, OP_INSERT) + body
                          for body in (_insert_body([{"tag": tag, "i": i}], ns)
                                       for i in range(count)))
        self.sock.sendall(frames)

    def update(self, selector: dict[str, Any], update: dict[str, Any], ns: str = "test.c") -> None:
        self.send(OP_UPDATE, _int32(0) + _cstring(ns) + _int32(0) + bson.encode(selector)
                  + bson.encode(update))

    def delete(self, selector: dict[str, Any], ns: str = "test.c") -> None:
        self.send(OP_DELETE, _int32(0) + _cstring(ns) + _int32(0) + bson.encode(selector))

    def kill_cursors(self, cursor_id: int) -> None:
        self.send(OP_KILL_CURSORS, _int32(0) + _int32(1) + struct.pack("<q", cursor_id))

    def send_query(self, ns: str, doc: dict[str, Any], n_return: int = 0,
                   flags: int = 0) -> int:
        return self.send(OP_QUERY, _int32(flags) + _cstring(ns) + _int32(0)
                         + _int32(n_return) + bson.encode(doc))

    def query(self, ns: str, doc: dict[str, Any], n_return: int = 0, flags: int = 0) -> Reply:
        return self.reply(self.send_query(ns, doc, n_return, flags))

    def get_more(self, ns: str, cursor_id: int, n_return: int) -> Reply:
        request_id = self.send(OP_GET_MORE, _int32(0) + _cstring(ns) + _int32(n_return)
                               + struct.pack("<q", cursor_id))
        return self.reply(request_id)

    def command(self, doc: dict[str, Any], db: str = "test") -> dict[str, Any]:
        reply = self.query(f"{db}.$cmd", doc, n_return=-1)
        assert len(reply.docs) == 1, reply
        return reply.docs[0]

    def reply(self, request_id: Optional[int]) -> Reply:
        """The next OP_REPLY; it must answer request_id (None: part of an exhaust stream)."""
        length, _, response_to, opcode = _HEADER.unpack(self._recv(16))
        body = self._recv(length - 16)
        assert opcode == OP_REPLY, f"opcode {opcode}"
        if request_id is not None:
            assert response_to == request_id, (response_to, request_id)
        flags, cursor_id, starting, count = _REPLY_PREFIX.unpack_from(body)
        docs = bson.decode_all(body[20:])
        assert len(docs) == count
        return Reply(flags, cursor_id, starting, docs, response_to)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the proxy")
            data += chunk
        return data

    def kill(self) -> None:
        """Vanish: reset the connection without a goodbye."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# -- mongod 2.4, scripted ------------------------------------------------------------------------

@dataclass
class Seen:
    """One request as the server saw it."""

    port: int                 # the server connection it arrived on (its client-side port)
    kind: str                 # insert, update, delete, query, getmore, killcursors, command, opmsg
    name: str = ""            # command name, lower case
    tag: Any = None           # the test's marker
    doc: dict[str, Any] = field(default_factory=dict)


@dataclass
class _LastError:
    """mongod 2.4's LastError (db/lasterror.h), one per server connection."""

    nprev: int = 1
    valid: bool = False
    n: int = 0
    err: Optional[str] = None
    code: Optional[int] = None
    updated_existing: Optional[bool] = None

    def record(self, n: int = 0, err: Optional[str] = None, code: Optional[int] = None,
               updated_existing: Optional[bool] = None) -> None:
        self.nprev, self.valid, self.n, self.err, self.code = 1, True, n, err, code
        self.updated_existing = updated_existing

    def reset(self) -> None:
        self.__init__()

    def append_self(self, out: dict[str, Any], blank_err: bool) -> None:
        if not self.valid:
            if blank_err:
                out["err"] = None
            out["n"] = 0
            return
        if self.err:
            out["err"] = self.err
        elif blank_err:
            out["err"] = None
        if self.code:
            out["code"] = self.code
        if self.updated_existing is not None:
            out["updatedExisting"] = self.updated_existing
        out["n"] = self.n


class Mongod24:
    """A standalone mongod 2.4 as mockupdb: maxWireVersion 0, last error per connection."""

    def __init__(self) -> None:
        self.server = MockupDB(auto_ismaster=None)
        self.port = self.server.run()
        self.address = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self._last: weakref.WeakKeyDictionary[socket.socket, _LastError] = \
            weakref.WeakKeyDictionary()
        self._cursors: dict[int, list[dict[str, Any]]] = {}
        self._cursor_ids = itertools.count(7000)
        self.server.autoresponds(self._respond)

    def stop(self) -> None:
        self.server.stop()

    def find(self, **match: Any) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if all(getattr(s, k) == v for k, v in match.items())]

    def opcodes_seen(self) -> set[str]:
        with self.lock:
            return {s.kind for s in self.seen}

    # -- dispatch ----------------------------------------------------------------------
    def _respond(self, request: Any) -> bool:
        with self.lock:
            last = self._last.setdefault(request._client, _LastError())
            if isinstance(request, (OpInsert, OpUpdate, OpDelete)):
                return self._write(request, last)
            if isinstance(request, OpKillCursors):      # does not affect the last error
                self._note(request, "killcursors", doc={"ids": request.cursor_ids})
                for cursor_id in request.cursor_ids:
                    self._cursors.pop(cursor_id, None)
                return True
            last.nprev += 1
            if isinstance(request, OpMsg):
                self._note(request, "opmsg", request.command_name or "")
                return request.replies({"ok": 0, "errmsg": "no such opcode in 2.4"})
            if isinstance(request, OpGetMore):
                return self._get_more(request)
            if isinstance(request, Command):
                return self._command(request, last)
            return self._query(request, last)

    def _note(self, request: Any, kind: str, name: str = "", tag: Any = None,
              doc: Optional[dict[str, Any]] = None) -> None:
        self.seen.append(Seen(request.client_port, kind, name, tag, dict(doc or {})))

    # -- writes ------------------------------------------------------------------------
    def _write(self, request: Any, last: _LastError) -> bool:
        kind = type(request).__name__[2:].lower()
        first = request.docs[0]
        if first.get("stray"):
            # Bytes the client that sent this write will never read.
            request._client.sendall(wire.op_reply([{"stray": True}], resp_to=0))
        self._note(request, kind, tag=first.get("tag"), doc=first)
        last.nprev += 1
        if first.get("dup"):
            last.record(err=DUP_KEY, code=11000)
        elif kind == "insert":
            last.record(n=len(request.docs))
        else:
            last.record(n=first.get("n", 1), updated_existing=True if kind == "update" else None)
        return True

    # -- commands ----------------------------------------------------------------------
    def _command(self, request: Any, last: _LastError) -> bool:
        doc = request.doc
        name = (request.command_name or "").lower()
        self._note(request, "command", name, doc.get("tag"), doc)
        if name in ("getlasterror", "getpreverror") or (
                name in ("ismaster", "replsetgetstatus") and legacy._true_value(
                    doc.get("forShell"))):
            last.nprev -= 1        # lastError.disableForCommand()
        if name == "ismaster":
            return request.replies(hello_24())
        if name == "getlasterror":
            return request.replies(self._gle(last, request.client_port))
        if name == "getpreverror":
            out: dict[str, Any] = {}
            last.append_self(out, blank_err=True)
            out["nPrev"] = last.nprev if last.valid else -1
            return request.replies(out)
        if name == "reseterror":
            last.reset()
            return request.replies({"ok": 1.0})
        if name == "replsetgetstatus":
            return request.replies({"ok": 0.0, "errmsg": "not running with --replSet"})
        return request.replies({"ok": 1.0})

    @staticmethod
    def _gle(last: _LastError, connection_id: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if last.nprev != 1:
            _LastError().append_self(out, blank_err=False)
        else:
            last.append_self(out, blank_err=False)
        out["connectionId"] = connection_id
        if "err" not in out:
            out["err"] = None
        out["ok"] = 1.0
        return out

    # -- queries -----------------------------------------------------------------------
    def _query(self, request: Any, last: _LastError) -> bool:
        self._note(request, "query", tag=request.doc.get("tag"), doc=request.doc)
        if request.namespace == "test.fail":
            last.record(err=BAD_QUERY, code=10068)        # a uassert sets the last error
            return request.fail(BAD_QUERY, code=10068)
        total = int(request.doc.get("total", 0))
        docs = [{"_id": i, "tag": request.doc.get("tag")} for i in range(total)]
        batch = abs(request.num_to_return or 0) or 10
        if request.flags & EXHAUST:
            return self._exhaust(request, docs, batch)
        return self._batch(request, docs, batch)

    def _batch(self, request: Any, docs: list[dict[str, Any]], batch: int,
               starting: int = 0) -> bool:
        first, rest = docs[:batch], docs[batch:]
        cursor_id = 0
        if rest:
            cursor_id = next(self._cursor_ids)
            self._cursors[cursor_id] = rest
        return request.replies(*first, cursor_id=cursor_id, starting_from=starting)

    def _get_more(self, request: Any) -> bool:
        self._note(request, "getmore", doc={"cursor": request.cursor_id})
        docs = self._cursors.pop(request.cursor_id, None)
        if docs is None:
            return request.replies(flags=CURSOR_NOT_FOUND)
        return self._batch(request, docs, request.num_to_return or 10)

    def _exhaust(self, request: Any, docs: list[dict[str, Any]], batch: int) -> bool:
        """Every batch at once, as mongod streams an exhaust query (the last has cursor 0)."""
        response_to = request.request_id
        for start in range(0, max(len(docs), 1), batch):
            chunk = docs[start:start + batch]
            cursor_id = 4242 if start + batch < len(docs) else 0
            frame = wire.op_reply(chunk, response_to, cursor_id=cursor_id, starting=start)
            request._client.sendall(frame)
            response_to = wire.request_id(frame)
        return True


def hello_24() -> dict[str, Any]:
    """isMaster as a 2.4 standalone answers it (2.4 sent no wire versions: 0 and 0)."""
    return {"ismaster": True, "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000,
            "localTime": datetime.datetime.now(UTC), "maxWireVersion": 0, "minWireVersion": 0,
            "ok": 1.0}
