"""Legacy writes and getLastError: each client keeps mongod 2.4's per-connection last error.

Before MongoDB 2.6 a write (OP_INSERT, OP_UPDATE, OP_DELETE) had no reply: the client
learned its outcome from a ``getLastError`` command sent next, which mongod answers from
state it keeps per connection. Behind a pool that state belongs to whichever client used
the server connection last, so the proxy keeps it per client instead.

Decisions, and where the proxy knowingly differs from mongod 2.4:

- OP_MSG never reaches a member whose maxWireVersion is below 6 (MongoDB < 3.6). A hello
  is answered by the proxy as always (a modern driver then sees maxWireVersion 0 and says
  why it cannot connect); any other OP_MSG gets ``{ok: 0, code: 188,
  codeName: IncompatibleServerVersion}`` (HostUnreachable, retryable, while the member
  has not answered its first check), and an OP_MSG with moreToCome, which has no reply
  to carry an error, closes the client. OP_COMPRESSED is always unwrapped by the relay.
- A repeated getLastError gets the first one's answer, even with other options (w, j,
  fsync, wtimeout), as dvara did; mongod would wait for the new write concern again.
- A write whose pin ended before a getLastError came (time-out, or another message in
  between) has an outcome the proxy never saw: getPrevError then answers as for a fresh
  connection (nPrev -1), where mongod would still report that write.
- A failed query (QueryFailure) becomes the last error, as mongod's uassert makes it; a
  command that fails with ``ok: 0`` does not, as in mongod. Forwarded getLastError
  replies carry the server's connectionId; the proxy's own answers carry the client's
  (the one its isMaster reports). ``lastOp`` is never added by the proxy.
- getLastError, getPrevError and resetError are recognised in any case of the name.

# design:
# mongod 2.4's LastError holds the outcome of the connection's latest write and nPrev,
# the number of messages since. Every message counts except killCursors, getLastError,
# getPrevError, and isMaster/replSetGetStatus carrying a true ``forShell``; getLastError
# reports the write only while nPrev is 1, and resetError forgets it. The proxy mirrors
# that per client in a ``LastError`` (``client.last_error``, made at the client's first
# legacy message). After a no-reply message the relay pins its server connection to the
# client until the client's next message (``pin``/``take_pin``/``release_pin`` here), so
# a getLastError right after a write is relayed on the connection of the write, and its
# reply is kept. Every later getLastError is answered by the proxy: with the kept reply
# while nPrev is 1, else with what mongod answers on a connection with no write. When a
# pin times out before the getLastError comes, the write's outcome is lost; the answer
# is then the "no write" one, never another client's. A pin ends after the client's next
# message, also one the proxy answers itself, unless that message leaves the last error
# alone: further writes, killCursors, getPrevError and forShell isMaster/replSetGetStatus
# keep it (bounded by the time-out, which only a write renews). Only OP_QUERY commands
# with one of these names are decoded; an OP_MSG costs one comparison (is the member new
# enough for OP_MSG?) and, for a client that used legacy opcodes, one addition. A
# client's state is touched only by the thread that owns the client (the worker relaying
# its message, or the acceptor while it is idle), so there is no lock.
"""

from __future__ import annotations

import base64
import logging
import select
import struct
import time
from typing import TYPE_CHECKING, Any, Optional

from bson.decimal128 import Decimal128

from dvara_lib import wire
from dvara_lib.proxy import hello
from dvara_lib.proxy.client import Verdict
from dvara_lib.proxy.session import LastError
from dvara_lib.errors import HOST_UNREACHABLE, INCOMPATIBLE_SERVER_VERSION, error_doc

if TYPE_CHECKING:
    from dvara_lib.proxy.client import ClientConn
    from dvara_lib.proxy.message import Message
    from dvara_lib.backend.pool import ServerConnection

log = logging.getLogger("dvara.legacy")

GET_LAST_ERROR, GET_PREV_ERROR, RESET_ERROR = "getlasterror", "getpreverror", "reseterror"
#: Commands that leave the last error alone when they carry a true ``forShell``.
FOR_SHELL_COMMANDS = frozenset({"isMaster", "ismaster", "hello", "replSetGetStatus"})
LEGACY_WRITES = frozenset({wire.OP_INSERT, wire.OP_UPDATE, wire.OP_DELETE})
#: OP_QUERY flag bit: the server streams every batch without waiting for OP_GET_MORE.
QUERY_EXHAUST = 1 << 6

# What to do with the server's reply to a message relayed on a pinned write.
_CAPTURE = "capture"    # a getLastError: keep its reply, give the connection back
_KEEP_PIN = "keep pin"  # getPrevError, replSetGetStatus with forShell: stay pinned

_IDS = struct.Struct("<ii")
_CURSOR_ID = struct.Struct("<q")


def describe(state: Optional["LastError"]) -> Optional[dict[str, Any]]:
    """A client's last error as JSON-able data (for a graceful restart)."""
    if state is None:
        return None
    reply = None if state.reply is None else base64.b64encode(state.reply).decode()
    return {"reply": reply, "nprev": state.nprev}


def restore(data: Optional[dict[str, Any]]) -> Optional["LastError"]:
    if not data:
        return None
    state = LastError()
    state.reply = None if data.get("reply") is None else base64.b64decode(data["reply"])
    state.nprev = int(data.get("nprev", 1))
    return state


class Legacy:
    """The legacy half of the relay: pins, and the last error of every client.

    Methods for the relay: handle() before a message is relayed, after_reply() once its
    reply is sent, take_pin(), pin() and release_pin() wherever a pin changes hands.
    """

    def __init__(self, pin_timeout: float) -> None:
        self.pin_timeout = pin_timeout

    # -- before a message -------------------------------------------------------------------
    def handle(self, client: "ClientConn", msg: "Message") -> Optional[Verdict]:
        """A step of the message chain: update client's last error for one message, and
        answer it if the proxy should.

        Returns PASS (None) when the message goes on as usual, else the verdict on the
        client once the proxy answered it (CLOSE if that failed). Can raise ProtocolError.
        """
        frame, op, name, compressor = msg.frame, msg.op, msg.name, msg.compressor
        if op == wire.OP_MSG:
            return self._op_msg(client, frame, name)
        state = client.last_error
        if state is None:
            state = client.last_error = LastError()
        state.after = None
        if op in LEGACY_WRITES:
            client.member.stats.incr("legacy.writes")
            state.wrote()
        elif op == wire.OP_QUERY and name is not None:
            return self._command(client, state, frame, name, compressor)
        elif op != wire.OP_KILL_CURSORS:   # mongod: "killCursors shouldn't affect last error"
            state.operation()
        return None

    def _op_msg(self, client: "ClientConn", frame: bytes,
                name: Optional[str]) -> Optional[Verdict]:
        """OP_MSG stays on the fast path; it never reaches a server older than 3.6."""
        member = client.member
        if member.max_wire_version < wire.OP_MSG_WIRE_VERSION and not hello.is_hello(name):
            return self._refuse_op_msg(client, frame)
        state = client.last_error
        if state is not None:
            state.operation()
            state.after = None
        return None

    def _command(self, client: "ClientConn", state: LastError, frame: bytes, name: str,
                 compressor: Optional[int]) -> Optional[Verdict]:
        lowered = name.lower()
        if lowered == GET_LAST_ERROR:
            return self._get_last_error(client, state, frame, compressor)
        if lowered == GET_PREV_ERROR:
            if self._outcome_pinned(client, state):
                state.after = _KEEP_PIN       # the server that took the write answers it
                return None
            return self._answer(client, state, frame, prev_error_doc(state), compressor)
        if lowered == RESET_ERROR:
            state.reset()
            return self._answer(client, state, frame, {"ok": 1.0}, compressor)
        if name in FOR_SHELL_COMMANDS and _true_value(wire.decode_query(frame)[4].get("forShell")):
            if name == "replSetGetStatus" and self._outcome_pinned(client, state):
                state.after = _KEEP_PIN
            return None
        state.operation()
        if hello.is_hello(name):
            self._unpin_spent(client, state)  # the proxy answers it: nothing runs on the pin
        return None

    def _get_last_error(self, client: "ClientConn", state: LastError, frame: bytes,
                        compressor: Optional[int]) -> Optional[Verdict]:
        stats = client.member.stats
        stats.incr("gle.calls")
        if self._outcome_pinned(client, state):
            state.after = _CAPTURE            # relayed on the write's own connection
            return None
        stats.incr("gle.answered_by_proxy")
        kept = state.reply if state.nprev == 1 else None
        if kept is None:
            return self._answer(client, state, frame, no_write_doc(client.id), compressor)
        self._unpin_spent(client, state)
        out = bytearray(kept)
        _IDS.pack_into(out, 4, wire.next_request_id(), wire.request_id(frame))
        return _send(client, bytes(out), compressor)

    def _answer(self, client: "ClientConn", state: LastError, frame: bytes,
                doc: dict[str, Any], compressor: Optional[int]) -> Verdict:
        """Answer a legacy command here; a pin that no longer serves a write is given back."""
        self._unpin_spent(client, state)
        return _send(client, wire.op_reply([doc], wire.request_id(frame)), compressor)

    def _unpin_spent(self, client: "ClientConn", state: LastError) -> None:
        """The pin ends with this message, as if the message had run on it."""
        if client.pinned is not None and not state.pending:
            self.release_pin(client, reusable=True)

    @staticmethod
    def _outcome_pinned(client: "ClientConn", state: LastError) -> bool:
        return state.pending and client.pinned is not None

    def _refuse_op_msg(self, client: "ClientConn", frame: bytes) -> Verdict:
        """Answer an OP_MSG that the member could not read (or close a moreToCome one)."""
        member = client.member
        if member.answer is None:
            doc = error_doc(HOST_UNREACHABLE, f"dvara: the server behind {member.proxy} has "
                            "not answered yet", retryable=True)
        else:
            doc = error_doc(INCOMPATIBLE_SERVER_VERSION,
                            f"dvara: the server behind {member.proxy} speaks wire version "
                            f"{member.max_wire_version} and does not understand OP_MSG; "
                            "use a driver that speaks the legacy opcodes")
        if not wire.expects_reply(frame):
            log.info("closing %s: it sent OP_MSG (moreToCome) to %s, which cannot read it",
                     client, member.real)
            return Verdict.CLOSE
        return _send(client, wire.reply_like(frame, doc), None)

    # -- after a reply --------------------------------------------------------------------
    def after_reply(self, client: "ClientConn", conn: "ServerConnection",
                    reply: bytes) -> None:
        """Keep what a relayed reply says; pin conn again if the write's outcome is still
        to be asked for on it."""
        state = client.last_error
        after, state.after = state.after, None
        if after == _CAPTURE:
            state.reply, state.pending = reply, False
        elif after == _KEEP_PIN:
            self.pin(client, conn, new=False, renew=False)
        elif query_failed(reply):
            state.failed(client.id, reply)

    # -- pins ----------------------------------------------------------------------------
    def pin(self, client: "ClientConn", conn: "ServerConnection", new: bool,
            renew: bool = True) -> None:
        """Keep conn for client's next message (for at most --get-last-error-timeout).

        The pin owns conn from now on: the ``with conn:`` block it came from no longer
        checks it in.
        """
        conn.pinned = True
        client.pinned = conn
        if renew:
            client.pin_deadline = time.monotonic() + self.pin_timeout
        stats = client.member.stats
        stats.gauge_add("gle.pinned", 1)
        if new:
            stats.incr("gle.pins")

    def take_pin(self, client: "ClientConn") -> Optional["ServerConnection"]:
        """The pinned connection, now the caller's (for the client's next message)."""
        conn, client.pinned = client.pinned, None
        if conn is not None:
            conn.pinned = False
            client.member.stats.gauge_add("gle.pinned", -1)
        return conn

    def release_pin(self, client: "ClientConn", reusable: bool) -> None:
        """Give a pinned connection back to its pool; the write's outcome is then lost.

        A connection the server wrote to (or closed) meanwhile is closed, never reused.
        """
        conn = self.take_pin(client)
        if client.last_error is not None:
            client.last_error.pending = False
        if conn is not None:
            client.member.pool.checkin(conn, reusable and not has_unread_bytes(conn))


# -- answers ------------------------------------------------------------------------------

def no_write_doc(connection_id: int) -> dict[str, Any]:
    """mongod 2.4's getLastError on a connection whose last operation was not a write."""
    return {"n": 0, "connectionId": connection_id, "err": None, "ok": 1.0}


def prev_error_doc(state: LastError) -> dict[str, Any]:
    """mongod 2.4's getPrevError, from the getLastError reply kept for the last write."""
    if state.reply is None:
        return {"err": None, "n": 0, "nPrev": -1, "ok": 1.0}
    kept = wire.reply_document(state.reply)
    doc: dict[str, Any] = {"err": kept.get("err")}
    for field in ("code", "updatedExisting", "upserted"):
        if field in kept:
            doc[field] = kept[field]
    doc["n"] = kept.get("n", 0)
    doc["nPrev"] = state.nprev
    doc["ok"] = 1.0
    return doc


def _send(client: "ClientConn", reply: bytes, compressor: Optional[int]) -> Verdict:
    if compressor is not None:
        reply = wire.compress(reply, compressor)
    return Verdict.RESUME if client.send(reply) else Verdict.CLOSE


def _true_value(value: Any) -> bool:
    """BSONElement::trueValue(): false for missing, null, false and zero; true otherwise."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, Decimal128):
        return value.to_decimal() != 0
    return True


# -- wire helpers ---------------------------------------------------------------------------

def exhaust_query(frame: bytes) -> bool:
    """An OP_QUERY with the Exhaust flag: its server streams OP_REPLYs until the cursor ends."""
    return wire.opcode(frame) == wire.OP_QUERY and bool(
        struct.unpack_from("<i", frame, 16)[0] & QUERY_EXHAUST)


def query_failed(reply: bytes) -> bool:
    """An OP_REPLY with the QueryFailure flag (its one document holds $err)."""
    return wire.opcode(reply) == wire.OP_REPLY and bool(
        struct.unpack_from("<i", reply, 16)[0] & wire.REPLY_QUERY_FAILURE)


def cursor_open(reply: bytes) -> bool:
    """An OP_REPLY whose cursor has more (in an exhaust stream, more replies follow)."""
    return wire.opcode(reply) == wire.OP_REPLY and _CURSOR_ID.unpack_from(reply, 20)[0] != 0


def has_unread_bytes(conn: "ServerConnection") -> bool:
    """True if the server sent something nobody read, or closed: the connection is spoiled."""
    if conn.rest:
        return True
    poller = select.poll()
    try:
        poller.register(conn.sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True
