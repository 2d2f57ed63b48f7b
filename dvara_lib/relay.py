"""Relaying one client message through a pooled server connection (runs in a worker).

# design:
# ``Relay.serve(client, frame)`` runs in a ThreadPoolExecutor thread. It answers hello
# itself, or checks a server connection out of the member's pool, sends the frame as
# bytes, relays the reply (or the stream of exhaust replies) and checks the connection
# back in at once. A connection is returned reusable only when nothing of its reply is
# left unread. A request that expects no reply (OP_MSG moreToCome, legacy writes) pins
# its server connection to the client until the client's next message, so that a read
# after a w:0 write sees it, and so that a legacy getLastError reaches the connection
# of the write it confirms (``dvara_lib.legacy`` keeps the pins and each client's last
# error). The worker hands the client back to the acceptor at the end.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import auth, hello, legacy, wire
from dvara_lib.client import ClientConn, ParkedHello
from dvara_lib.errors import (AuthenticationFailure, ConnectionFailure, PoolTimeout,
                              ProtocolError, ServerTimeout)

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.pool import ServerConnection
    from dvara_lib.topology import Member, Topology

log = logging.getLogger("dvara.relay")

#: Commands whose replies name members, and so are rewritten to proxy addresses.
REWRITTEN_REPLIES = frozenset({"replSetGetStatus", "replSetGetConfig", "serverStatus",
                               "isdbgrid"})
#: Commands counted as mutations (with the legacy write opcodes).
MUTATIONS = frozenset({"insert", "update", "delete", "findAndModify", "findandmodify"})

#: Byte strings that only a "not primary" / "node is recovering" / shutdown error reply
#: holds; small replies are scanned for them (in C) before anything is decoded.
STATE_CHANGE_MARKERS = (b"NotWritablePrimary", b"NotPrimary", b"InterruptedDueToReplStateChange",
                        b"PrimarySteppedDown", b"ShutdownInProgress", b"InterruptedAtShutdown",
                        b"not master", b"not primary", b"node is recovering")
STATE_CHANGE_CODES = frozenset({10107, 13435, 13436, 11602, 189, 10058, 91, 11600})
SHUTDOWN_CODES = frozenset({91, 11600})
_SCANNED_REPLY_SIZE = 16 * 1024

#: How long a hello to a member that was never checked may wait for its first check.
FIRST_CHECK_WAIT = 10.0

# Error codes drivers understand (see pymongo's retryable codes).
EXCEEDED_TIME_LIMIT = 262
HOST_UNREACHABLE = 6

#: What a worker tells the acceptor when it hands a client back.
RESUME, PARK, CLOSE = "resume", "park", "close"
Handback = Callable[[ClientConn, str], None]


class Relay:
    """The per-message work of the proxy. One instance, shared by every worker."""

    def __init__(self, settings: "Settings", topology: "Topology", handback: Handback,
                 on_server_failure: Callable[["Member"], None] = lambda m: None,
                 on_state_change: Callable[["Member", bool], None] = lambda m, s: None) -> None:
        self.settings = settings
        self.topology = topology
        self.handback = handback
        self.on_server_failure = on_server_failure
        self.on_state_change = on_state_change
        self.legacy = legacy.Legacy(settings.get_last_error_timeout)
        self.gate = auth.Gate.from_settings(settings)   # issue 7: client logins, or None

    # -- entry point --------------------------------------------------------------------
    def serve(self, client: ClientConn, frame: bytes) -> None:
        """Handle one whole message from client, then hand the client back."""
        verdict = CLOSE
        try:
            verdict = self._serve(client, frame)
        except ProtocolError as exc:
            client.member.stats.incr("errors.bad_frame")
            log.warning("client %s sent a bad message (%s); closing it", client, exc)
        except Exception:
            client.member.stats.incr("errors.proxy")
            log.exception("unexpected error serving %s; closing it", client)
        finally:
            self.handback(client, verdict)

    def _serve(self, client: ClientConn, frame: bytes) -> str:
        compressor: Optional[int] = None
        if wire.opcode(frame) == wire.OP_COMPRESSED:
            frame, compressor = wire.decompress(frame)
        op = wire.opcode(frame)
        if op not in wire.KNOWN_REQUEST_OPCODES or op == wire.OP_COMPRESSED:
            raise ProtocolError(f"unsupported opcode {op}")
        if op == wire.OP_MSG:
            frame = wire.check_msg_flags(frame)
        name = wire.command_name(frame)
        stats = client.member.stats
        stats.incr("requests")
        if op in (wire.OP_INSERT, wire.OP_UPDATE, wire.OP_DELETE) or name in MUTATIONS:
            stats.incr("requests.mutations")
        if self.gate is not None:               # issue 7: client authentication (auth.py)
            allowed = self.gate.check(client, frame, op, name, compressor)
            if allowed is not None:
                return RESUME if allowed else CLOSE
        answered = self.legacy.handle(client, frame, op, name, compressor)
        if answered is not None:
            return RESUME if answered else CLOSE
        if hello.is_hello(name):
            return self.answer_hello(client, frame, name, compressor)
        return self._relay(client, frame, name, compressor)

    def serve_parked(self, client: ClientConn, parked: ParkedHello) -> None:
        """Answer a parked hello (its member changed or its time is up), then hand back."""
        verdict = CLOSE
        try:
            verdict = self.send_hello(client, parked.frame, parked.request, parked.command,
                                      parked.exhaust)
        except Exception:
            log.exception("unexpected error answering a parked hello of %s", client)
        finally:
            self.handback(client, verdict)

    def parked_now(self, frame: bytes, command: str, exhaust: bool) -> ParkedHello:
        """A parked hello (moved from the process this one replaced) due at once."""
        return ParkedHello(frame, _request_doc(frame), command, time.monotonic(), exhaust, -1)

    def release_pin(self, client: ClientConn, reusable: bool) -> None:
        """Give a pinned server connection back to its pool (no blocking I/O)."""
        self.legacy.release_pin(client, reusable)

    # -- hello ----------------------------------------------------------------------------
    def answer_hello(self, client: ClientConn, frame: bytes, name: str,
                     compressor: Optional[int]) -> str:
        """Answer a hello/isMaster from the member's latest state, or park it."""
        request = _request_doc(frame)
        member = client.member
        if "compression" in request:
            client.compressors = hello.negotiate_compression(request)
        wait = hello.wait_seconds(request, self.topology, member)
        if member.answer is None or member.suspect:
            # Never checked yet, or a reply just said it changed: answer after a fresh check.
            wait = FIRST_CHECK_WAIT
        exhaust = wire.opcode(frame) == wire.OP_MSG and bool(
            wire.msg_flags(frame) & wire.EXHAUST_ALLOWED)
        if wait > 0:
            counter = -1 if member.suspect else member.counter
            client.parked = ParkedHello(frame, request, name, time.monotonic() + wait,
                                        exhaust, counter)
            return PARK
        return self.send_hello(client, frame, request, name, exhaust)

    def send_hello(self, client: ClientConn, frame: bytes, request: dict[str, Any],
                   name: str, exhaust: bool) -> str:
        """Write the hello answer; with exhaustAllowed, keep streaming (park again)."""
        member = client.member
        doc = hello.build_answer(self.topology, member, name, request, client.id,
                                 client.compressors)
        if doc is None:
            log.info("no hello yet from %s; closing %s", member.real, client)
            return CLOSE
        member.stats.incr("hello.answered")
        if self.gate is not None:               # issue 7: saslSupportedMechs, speculative login
            self.gate.on_hello(client, request, doc)
        if exhaust:
            reply = wire.reply_like(frame, doc, flags=wire.MORE_TO_COME)
            if not client.send(reply):
                return CLOSE
            wait = hello.max_await_seconds(request)
            wait = 10.0 if wait is None else wait
            # The next reply of the stream answers this one (OP_MSG exhaust rule).
            next_frame = wire.with_request_id(frame, wire.request_id(reply))
            client.parked = ParkedHello(next_frame, request, name, time.monotonic() + wait,
                                        True, member.counter)
            return PARK
        return RESUME if client.send(wire.reply_like(frame, doc)) else CLOSE

    # -- relaying -------------------------------------------------------------------------
    def _relay(self, client: ClientConn, frame: bytes, name: Optional[str],
               compressor: Optional[int]) -> str:
        member = client.member
        start = time.monotonic()
        conn = self.legacy.take_pin(client)
        was_pinned = conn is not None
        if conn is None:
            conn = self._checkout(client, frame)
            if conn is None:
                return RESUME if wire.expects_reply(frame) else CLOSE
        try:
            conn.send(frame)
        except ConnectionFailure as exc:
            self._server_failed(member, conn, exc)
            return CLOSE
        if not wire.expects_reply(frame):
            self.legacy.pin(client, conn, new=not was_pinned)
            return RESUME
        member.stats.incr("requests.with_reply")
        verdict = self._relay_replies(client, conn, frame, name, compressor)
        member.stats.observe("latency", time.monotonic() - start)
        return verdict

    def _checkout(self, client: ClientConn, frame: bytes) -> Optional["ServerConnection"]:
        """A server connection, or None after answering the client with an error."""
        member = client.member
        try:
            if not member.up and member.answer is not None:
                raise ConnectionFailure(f"{member.real} is down (last check failed)")
            return member.pool.checkout(self.settings.pool_wait_timeout)
        except PoolTimeout as exc:
            member.stats.incr("errors.timeout")
            self._send_error(client, frame, EXCEEDED_TIME_LIMIT, "ExceededTimeLimit",
                             f"dvara: {exc}")
        except ConnectionFailure as exc:
            member.stats.incr("errors.proxy")
            # issue 7: a refused login is no dead member; auth.py logs it, spaced out
            login = isinstance(exc, AuthenticationFailure)
            (log.debug if login else log.warning)("cannot connect to %s: %s", member.real, exc)
            if not login:
                self.on_server_failure(member)
            self._send_error(client, frame, HOST_UNREACHABLE, "HostUnreachable",
                             f"dvara: cannot reach the server behind {member.proxy}"
                             + (" (dvara cannot log in to it)" if login else ""))
        return None

    def _relay_replies(self, client: ClientConn, conn: "ServerConnection", frame: bytes,
                       name: Optional[str], compressor: Optional[int]) -> str:
        """Relay the reply, or every reply of an exhaust stream; check conn back in."""
        member = client.member
        clean = False
        exhaust = legacy.exhaust_query(frame)
        try:
            reply = conn.read_frame()
            if wire.response_to(reply) != wire.request_id(frame):
                raise ProtocolError(f"server reply answers {wire.response_to(reply)}, "
                                    f"not {wire.request_id(frame)}")
            if len(reply) < _SCANNED_REPLY_SIZE and any(m in reply for m in STATE_CHANGE_MARKERS):
                self._check_state_change(member, reply)
            while True:
                streaming = wire.more_to_come(reply) or (exhaust and legacy.cursor_open(reply))
                if streaming:
                    member.stats.incr("replies.streamed")
                out = self._client_reply(reply, name, compressor)
                if not client.send(out):
                    clean = not streaming
                    return CLOSE
                if not streaming:
                    clean = True
                    if client.last_error is not None:
                        conn = self.legacy.after_reply(client, conn, reply)
                    return RESUME
                reply = conn.read_frame()
        except (ConnectionFailure, ProtocolError) as exc:
            self._server_failed(member, conn, exc)
            conn = None
            return CLOSE
        finally:
            if conn is not None:
                member.pool.checkin(conn, clean)

    def _check_state_change(self, member: "Member", reply: bytes) -> None:
        """A "not primary", "node is recovering" or shutdown error: have discovery look now."""
        try:
            doc = wire.reply_document(reply)
        except ProtocolError:
            return
        codes = {doc.get("code"), (doc.get("writeConcernError") or {}).get("code")}
        codes.update(e.get("code") for e in doc.get("writeErrors") or [] if isinstance(e, dict))
        hit = codes & STATE_CHANGE_CODES
        if hit:
            log.info("%s answered %s; checking the replica set now", member.real, sorted(hit))
            self.on_state_change(member, bool(hit & SHUTDOWN_CODES))

    def _client_reply(self, reply: bytes, name: Optional[str], compressor: Optional[int]) -> bytes:
        if name in REWRITTEN_REPLIES:
            reply = self._rewrite_reply(reply)
        if compressor is not None:
            reply = wire.compress(reply, compressor)
        return reply

    def _rewrite_reply(self, reply: bytes) -> bytes:
        """A reply with every real member address replaced by its proxy address."""
        if wire.opcode(reply) == wire.OP_MSG:
            doc = self.topology.rewrite_addresses(wire.decode_msg_body(reply))
            flags = wire.msg_flags(reply) & wire.MORE_TO_COME
            return wire.op_msg(doc, resp_to=wire.response_to(reply), flags=flags,
                               req_id=wire.request_id(reply))
        flags, cursor_id, starting, docs = wire.decode_reply(reply)
        out = wire.op_reply([self.topology.rewrite_addresses(d) for d in docs],
                            wire.response_to(reply), flags, cursor_id, starting)
        return out

    def _server_failed(self, member: "Member", conn: "ServerConnection",
                       exc: Exception) -> None:
        """Close a failed server connection; a network error also retires its pool."""
        member.pool.checkin(conn, reusable=False)
        if isinstance(exc, ServerTimeout):
            member.stats.incr("errors.timeout")
            log.warning("%s did not answer within %.1fs; closing the client",
                        member.real, self.settings.message_timeout)
            return
        member.stats.incr("errors.proxy")
        log.warning("connection to %s failed (%s); clearing its pool", member.real, exc)
        if isinstance(exc, ConnectionFailure):
            member.pool.clear()
            self.on_server_failure(member)

    def _send_error(self, client: ClientConn, frame: bytes, code: int, code_name: str,
                    errmsg: str) -> None:
        """Answer a request the proxy could not relay, in the request's own protocol."""
        if not wire.expects_reply(frame):
            return
        doc: dict[str, Any] = {"ok": 0.0, "errmsg": errmsg, "code": code,
                               "codeName": code_name, "errorLabels": ["RetryableWriteError"]}
        op = wire.opcode(frame)
        if op == wire.OP_QUERY and wire.command_name(frame) is not None:
            client.send(wire.op_reply([doc], wire.request_id(frame)))
        elif op in (wire.OP_QUERY, wire.OP_GET_MORE):
            client.send(wire.op_reply([{"$err": errmsg, "code": code}], wire.request_id(frame),
                                      flags=wire.REPLY_QUERY_FAILURE))
        else:
            client.send(wire.reply_like(frame, doc))


def _request_doc(frame: bytes) -> dict[str, Any]:
    if wire.opcode(frame) == wire.OP_MSG:
        return wire.decode_msg_body(frame)
    return wire.decode_query(frame)[4]
