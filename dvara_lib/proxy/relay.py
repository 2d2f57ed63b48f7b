"""Relaying client messages through pooled server connections (runs in the workers).

# design:
# ``Relay.serve(client, frame)`` runs in a worker thread that owns the client. The usual
# message takes the fast path, undecoded; any other goes down the steps of
# dvara_lib.proxy.message (login gate, legacy, hello), any of which may answer it. What
# is left is relayed: a server connection is checked out of the member's pool, the
# frame is sent as bytes and the whole reply read, and the connection is checked back
# in before the reply is written to the client: a client that reads
# slowly costs a worker (for at most --message-timeout) but never a server connection.
# Only an exhaust stream keeps its connection while its replies are written, as the
# server sends them on that connection alone. A request that expects no reply pins its
# server connection to the client until the client's next message, so that a read
# after a w:0 write sees it, and so that a legacy getLastError reaches the connection
# of the write it confirms (``dvara_lib.proxy.legacy`` keeps the pins and each client's last
# error). Then the worker serves the client's next message itself if it is already
# buffered, or arrives within the linger time while no other message waits; otherwise
# it lets the client go (``ClientConn.release``), which needs the acceptor only when
# there is something for it to do (park a hello, close, drain, throttle).
"""

from __future__ import annotations

import logging
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sized, Union

from dvara_lib import wire
from dvara_lib.proxy.gate import Gate, RunCommand
from dvara_lib.proxy import hello
from dvara_lib.proxy import legacy
from dvara_lib.proxy.client import ClientConn, Fill, ParkedHello, Verdict
from dvara_lib.proxy.message import PASS, Message, Outcome, Step
from dvara_lib.errors import (AUTHENTICATION_FAILED, EXCEEDED_TIME_LIMIT, HOST_UNREACHABLE,
                              AuthenticationFailure,
                              ConnectionFailure, PoolTimeout, ProtocolError, ServerTimeout,
                              error_doc)

if TYPE_CHECKING:
    from dvara_lib.config import Settings
    from dvara_lib.backend.pool import ServerConnection
    from dvara_lib.backend.topology import Member, Topology

log = logging.getLogger("dvara.relay")

#: Commands whose replies name members, and so are rewritten to proxy addresses.
REWRITTEN_REPLIES = frozenset({"replSetGetStatus", "replSetGetConfig", "serverStatus",
                               "isdbgrid"})
#: Commands counted as mutations (with the legacy write opcodes).
MUTATIONS = frozenset({"insert", "update", "delete", "findAndModify", "findandmodify"})

#: Byte strings that only a "not primary" / "node is recovering" / shutdown error reply
#: holds; small replies holding an error field ("errmsg", or the legacy "err"/"$err")
#: are scanned for them (in C) before anything is decoded.
STATE_CHANGE_MARKERS = (b"NotWritablePrimary", b"NotPrimary", b"InterruptedDueToReplStateChange",
                        b"PrimarySteppedDown", b"ShutdownInProgress", b"InterruptedAtShutdown",
                        b"not master", b"not primary", b"node is recovering")
STATE_CHANGE_CODES = frozenset({10107, 13435, 13436, 11602, 189, 10058, 91, 11600})
SHUTDOWN_CODES = frozenset({91, 11600})
_SCANNED_REPLY_SIZE = 16 * 1024

#: How long a hello to a member that was never checked may wait for its first check.
FIRST_CHECK_WAIT = 10.0
#: How often a worker letting a client go reads what came meanwhile before it asks the
#: acceptor to take over (a client trickling bytes cannot keep a worker).
_RELEASE_TRIES = 4

#: The header tail and flags of an OP_MSG with no flag set and its body section first.
_PLAIN_OP_MSG = struct.pack("<iIB", wire.OP_MSG, 0, 0)
_OP_MSG_BYTES = struct.pack("<i", wire.OP_MSG)
_MORE_TO_COME = wire.MORE_TO_COME
_OP_MSG_WIRE_VERSION = wire.OP_MSG_WIRE_VERSION
#: Command names the fast path leaves to the general one (as BSON keys).
_SPECIAL_KEYS = frozenset(n.encode() for n in hello.HELLO_NAMES | REWRITTEN_REPLIES)
_MUTATION_KEYS = frozenset(n.encode() for n in MUTATIONS)

#: The verdicts by plain names: reading an attribute of an Enum class passes through
#: EnumType.__getattr__'s hook in CPython 3.11, which costs more than a message's checks.
RESUME, CLOSE, PARK = Verdict.RESUME, Verdict.CLOSE, Verdict.PARK

Handback = Callable[[ClientConn, Verdict, Optional[ParkedHello]], None]


class Draining(Protocol):
    """What the relay reads of the acceptor: whether it drains (then it must see every
    client let go). An attribute, not a call: it is read once per message."""

    draining: bool


class Backlog(Protocol):
    """What the relay reads of the dispatcher, without a lock, as hints: messages
    queued for a worker, and messages held back for their member's share."""

    queued: Sized
    held: int


class _NeverDraining:
    draining = False


class _AlwaysBacklogged:
    queued = (None,)
    held = 1


_NEVER_DRAINING = _NeverDraining()
_ALWAYS_BACKLOGGED = _AlwaysBacklogged()


class Relay:
    """The per-message work of the proxy. One instance, shared by every worker.

    ``backlog`` says whether any message waits for a worker (then a worker does not
    linger on its client, and queues the client's next message behind the others with
    ``requeue`` rather than serve it at once); ``acceptor.draining`` whether the
    acceptor must see every client let go (while it drains).
    """

    def __init__(self, settings: "Settings", topology: "Topology", handback: Handback,
                 on_server_failure: Callable[["Member"], None] = lambda m: None,
                 on_state_change: Callable[["Member", bool], None] = lambda m, s: None,
                 run_command: Optional[RunCommand] = None) -> None:
        self.settings = settings
        self.topology = topology
        self.handback = handback
        self.on_server_failure = on_server_failure
        self.on_state_change = on_state_change
        self.legacy = legacy.Legacy(settings.get_last_error_timeout)
        self.gate = Gate.from_settings(settings, run_command, self._clear_user)  # or None
        self.passthrough = settings.auth_passthrough   # member pools are UserPools
        gate_step: list[Step] = [] if self.gate is None else [self.gate.check]
        self._steps: list[Step] = [*gate_step, self.legacy.handle, self._hello_step]
        self.backlog: Backlog = _ALWAYS_BACKLOGGED
        self.acceptor: Draining = _NEVER_DRAINING
        self.requeue: Callable[[ClientConn, bytes], None] = lambda client, frame: None

    def _clear_user(self, key: tuple[str, str]) -> None:
        """--auth-query saw key's verifier change: close its server connections."""
        for member in self.topology.members():
            clear = getattr(member.pool, "clear_user", None)
            if clear is not None:
                clear(key)

    def apply_settings(self, settings: "Settings") -> None:
        """Settings a reload changed (SIGHUP)."""
        self.settings = settings
        self.legacy.pin_timeout = settings.get_last_error_timeout

    # -- entry points (worker threads) ------------------------------------------------------
    def serve(self, client: ClientConn, frame: bytes) -> None:
        """Handle client's message, and its next ones while they come at once; let go.

        The usual next message is waited for here, inline (nothing buffered, the worker
        may linger, no other message waits, no drain): a busy client's messages then
        cost one pass of this loop each, and every call saved counts. Anything else is
        _next_or_release's."""
        outcome: Outcome = CLOSE
        backlog = self.backlog
        io = client.io
        try:
            while True:
                fast = self._relay_plain(client, frame)     # None: not the usual message
                outcome = fast if fast is not None else self._serve_any(client, frame)
                if outcome is not RESUME:
                    break
                if client.buf or client.counted or io.linger <= 0 or client.reader \
                        is not None or client.closing or self.acceptor.draining \
                        or backlog.queued or backlog.held:
                    after = self._next_or_release(client)
                else:
                    after = client.wait_message()
                    if after is None:
                        after = self._release(client)
                    elif backlog.queued or backlog.held:
                        self.requeue(client, after)
                        return
                if after is None:
                    return                  # let go: the acceptor owns the client again
                if isinstance(after, Verdict):
                    outcome = after
                    break
                frame = after
        except ProtocolError as exc:
            client.member.stats.incr("errors.bad_frame")
            log.warning("client %s sent a bad message (%s); closing it", client, exc)
            outcome = CLOSE
        except Exception:
            client.member.stats.incr("errors.proxy")
            log.exception("unexpected error serving %s; closing it", client)
            outcome = CLOSE
        self._hand_back(client, outcome)

    def serve_parked(self, client: ClientConn, parked: ParkedHello) -> None:
        """Answer a parked hello (its member changed or its time is up), then hand back."""
        outcome: Outcome = CLOSE
        try:
            outcome = self.send_hello(client, parked.frame, _request_doc(parked.frame),
                                      parked.command, parked.exhaust)
        except Exception:
            log.exception("unexpected error answering a parked hello of %s", client)
        self._hand_back(client, outcome)

    def _hand_back(self, client: ClientConn, outcome: Outcome) -> None:
        if isinstance(outcome, ParkedHello):
            self.handback(client, PARK, outcome)
        else:
            self.handback(client, outcome, None)

    def _next_or_release(self, client: ClientConn) -> Union[bytes, Verdict, None]:
        """The client's next message to serve now; None once the client is let go; or
        the Verdict to hand it back with. Can raise ProtocolError."""
        if self.acceptor.draining:
            return RESUME       # a drain: what the client sent moves with it
        if client.buf or client.counted:
            frame = client.next_frame()
        elif self._may_linger(client):
            frame = client.wait_message()
        else:
            frame = None
        if frame is not None:
            return self._now_or_queued(client, frame)
        return self._release(client)

    def _release(self, client: ClientConn) -> Union[bytes, Verdict, None]:
        """Let client go (nothing of it is buffered), unless it sent more meanwhile: as
        _next_or_release."""
        for _ in range(_RELEASE_TRIES):
            if client.closing:
                return CLOSE
            if self.acceptor.draining or (client.io.budget.spent and client.mid_message()):
                return RESUME       # the acceptor decides (drain, throttle)
            try:
                if client.release():
                    return None
            except OSError:
                return CLOSE        # its socket broke
            if client.fill() is Fill.CLOSED:   # it became readable while we owned it
                client.closing = True          # done sending: serve what it sent, then close
            frame = client.next_frame()
            if frame is not None:
                return self._now_or_queued(client, frame)
        return RESUME

    def _now_or_queued(self, client: ClientConn, frame: bytes) -> Optional[bytes]:
        """frame, to serve now; or None once it is queued behind the messages that
        wait for a worker (they came first; the client goes with it)."""
        if not self.others_waiting():
            return frame
        self.requeue(client, frame)
        return None

    def _may_linger(self, client: ClientConn) -> bool:
        """Wait on the client's socket for its next message (nothing is buffered)."""
        return client.io.linger > 0 and client.reader is None and not client.closing \
            and not self.others_waiting()

    def others_waiting(self) -> bool:
        """Whether a message waits for a worker (read without a lock: a hint)."""
        return bool(self.backlog.queued) or self.backlog.held > 0

    def parked_now(self, frame: bytes, command: str, exhaust: bool) -> ParkedHello:
        """A parked hello (moved from the process this one replaced) due at once."""
        return ParkedHello(frame, command, time.monotonic(), exhaust, -1)

    def release_pin(self, client: ClientConn, reusable: bool) -> None:
        """Give a pinned server connection back to its pool (no blocking I/O)."""
        self.legacy.release_pin(client, reusable)

    # -- one message: auth gate, legacy, hello, relay --------------------------------------
    def serve_one(self, client: ClientConn, frame: bytes) -> Outcome:
        """Handle one whole message from client. Can raise ProtocolError."""
        outcome = self._relay_plain(client, frame)
        return self._serve_any(client, frame) if outcome is None else outcome

    def _relay_plain(self, client: ClientConn, frame: bytes) -> Optional[Outcome]:
        """The fast path, for the usual message: an OP_MSG command with no flags, its
        body first, neither a hello nor a command whose reply names members, from a
        client with no login gate, no legacy state and no pin, to a member that speaks
        OP_MSG. Check out, send, read the whole reply, check in, write it. None, having
        done nothing, for any other message.
        (Its calls pass their arguments by position: a keyword argument costs a call
        without the interpreter's shortcuts.)"""
        if len(frame) < 27 or frame[12:21] != _PLAIN_OP_MSG or frame[25] == 0 \
                or self.gate is not None or client.last_error is not None \
                or client.pinned is not None:
            return None
        member = client.member
        end = frame.find(b"\x00", 26)
        key = frame[26:end]
        if end < 0 or key in _SPECIAL_KEYS or member.max_wire_version < _OP_MSG_WIRE_VERSION:
            return None
        pool = member.pool
        start = time.monotonic()
        # The usual case: an idle connection to a member that is up; it records nothing.
        # (Anything else, a member down included, is _checkout's to answer.)
        conn = pool.checkout_idle() if member.up else None
        quick = conn is not None
        if conn is None:
            conn = self._checkout(client, frame)
            if conn is None:
                member.stats.incr("requests")
                return CLOSE if client.closing else RESUME
        try:
            conn.send(frame)
            reply = conn.read_frame()
            # (_streams' first test inline: a call per message costs more than it.)
            if reply[8:12] != frame[4:8] or (len(reply) > 16 and reply[16] & _MORE_TO_COME
                                             and _streams(reply)):
                raise ProtocolError(_unexpected_reply(frame, reply))
        except BaseException as exc:
            conn.spoil()
            pool.checkin(conn, False, not quick)
            if not isinstance(exc, (ConnectionFailure, ProtocolError)):
                raise
            self._server_failed(member, exc)
            member.stats.incr("requests")
            return CLOSE
        now = time.monotonic()
        if quick:
            pool.checkin_idle(conn, now)
        else:
            pool.checkin(conn, True)
        if reply.find(b"err") >= 0 and len(reply) < _SCANNED_REPLY_SIZE \
                and _may_say_state_change(reply):
            self._check_state_change(member, reply)
        sent = client.send(reply, False)
        member.stats.relayed(len(frame), len(reply) if sent else 0, key in _MUTATION_KEYS,
                             time.monotonic() - start, now - start if quick else None)
        return RESUME if sent else CLOSE

    def _serve_any(self, client: ClientConn, frame: bytes) -> Outcome:
        """Any message: compressed, legacy, hello, authentication, streams, pins. It goes
        down the steps until one handles it; the relay to a server handles the rest."""
        stats = client.member.stats
        stats.incr("requests")
        stats.incr("bytes.in", len(frame))
        msg = Message.read(frame)
        if msg.op in legacy.LEGACY_WRITES or msg.name in MUTATIONS:
            stats.incr("requests.mutations")
        for step in self._steps:
            outcome = step(client, msg)
            if outcome is not PASS:
                return outcome
        return self._relay(client, msg)

    def _hello_step(self, client: ClientConn, msg: Message) -> Optional[Outcome]:
        if not hello.is_hello(msg.name):
            return PASS
        return self.answer_hello(client, msg.frame, str(msg.name), msg.compressor)

    # -- hello ----------------------------------------------------------------------------
    def answer_hello(self, client: ClientConn, frame: bytes, name: str,
                     compressor: Optional[int]) -> Outcome:
        """Answer a hello/isMaster from the member's latest state, or park it."""
        request = _request_doc(frame)
        member = client.member
        if "compression" in request:
            client.compressors = hello.negotiate_compression(request)
        wait = hello.wait_seconds(request, self.topology, member)
        if member.suspect or (member.answer is None and not member.checked_at):
            # Never checked yet, or a reply just said it changed: answer after a fresh check.
            # (Checked but never reachable: closed at once, not held, so that a driver's
            # first round-trip time once it answers is not the time it was held.)
            wait = FIRST_CHECK_WAIT
        exhaust = wire.opcode(frame) == wire.OP_MSG and bool(
            wire.msg_flags(frame) & wire.EXHAUST_ALLOWED)
        if wait > 0:
            counter = -1 if member.suspect else member.counter
            return ParkedHello(frame, name, time.monotonic() + wait, exhaust, counter)
        return self.send_hello(client, frame, request, name, exhaust)

    def send_hello(self, client: ClientConn, frame: bytes, request: dict[str, Any],
                   name: str, exhaust: bool) -> Outcome:
        """Write the hello answer; with exhaustAllowed, keep streaming (park again)."""
        member = client.member
        doc = hello.build_answer(self.topology, member, name, request, client.id,
                                 client.compressors)
        if doc is None:
            if member.answer is None:
                log.info("no hello yet from %s; closing %s", member.real, client)
            else:
                log.debug("router %s is down; closing %s", member.real, client)
            return CLOSE
        member.stats.incr("hello.answered")
        if self.gate is not None:               # saslSupportedMechs, speculative login
            self.gate.on_hello(client, request, doc)
        if not exhaust:
            return _sent(client.send(wire.reply_like(frame, doc)))
        reply = wire.reply_like(frame, doc, flags=wire.MORE_TO_COME)
        if not client.send(reply):
            return CLOSE
        wait = hello.max_await_seconds(request)
        # The next reply of the stream answers this one (OP_MSG exhaust rule).
        next_frame = wire.with_request_id(frame, wire.request_id(reply))
        return ParkedHello(next_frame, name,
                           time.monotonic() + (10.0 if wait is None else wait), True,
                           member.counter)

    # -- relaying -------------------------------------------------------------------------
    def _relay(self, client: ClientConn, msg: Message) -> Outcome:
        frame, name, compressor = msg.frame, msg.name, msg.compressor
        member = client.member
        start = time.monotonic()
        conn = self.legacy.take_pin(client)
        if conn is not None and self.passthrough and conn.user != _user_key(client):
            member.pool.checkin(conn, False)           # logged in as another user since
            conn = None
        was_pinned = conn is not None
        if conn is None:
            conn = self._checkout(client, frame)
            if conn is None:
                return RESUME if wire.expects_reply(frame) and not client.closing \
                    else CLOSE
        with conn:
            if not self._send(member, conn, frame):
                return CLOSE
            if not wire.expects_reply(frame):
                self.legacy.pin(client, conn, new=not was_pinned)
                return RESUME
            member.stats.incr("requests.with_reply")
            reply = self._read_reply(member, conn, frame)
            if reply is None:
                return CLOSE
            if wire.more_to_come(reply) or (legacy.exhaust_query(frame)
                                            and legacy.cursor_open(reply)):
                return self._stream(client, conn, frame, reply, name, compressor, start)
            if client.last_error is not None:
                self.legacy.after_reply(client, conn, reply)
        # The connection is back in the pool (or pinned): now the client may be slow.
        verdict = _sent(client.send(self._client_reply(reply, name, compressor)))
        member.stats.observe("latency", time.monotonic() - start)
        return verdict

    def _checkout(self, client: ClientConn, frame: bytes) -> Optional["ServerConnection"]:
        """A server connection (--auth-passthrough: logged in as the client's own user,
        or not at all before its login), or None after answering the client with an
        error (or, --load-balanced, marking it to be closed when its server cannot be
        reached). A refused login of the client's own user clears that user's
        connections and logs the client out."""
        member = client.member
        login = client.auth.login if self.passthrough and client.auth is not None else None
        try:
            if not member.up and member.answer is not None:
                raise ConnectionFailure(f"{member.real} is down (last check failed)")
            if not self.passthrough:
                return member.pool.checkout(self.settings.pool_wait_timeout)
            return member.pool.checkout_as(_user_key(client), login,
                                           self.settings.pool_wait_timeout)
        except AuthenticationFailure as exc:
            if login is None:
                self._checkout_failed(client, frame, exc)
                return None
            member.pool.clear_user(login.key)
            client.auth = None                # its ClientKey is of no use any more
            log.warning("%s refused the login as %s.%s (%s); logged %s out", member.real,
                        login.db, login.name, exc, client)
            self._send_error(client, frame, AUTHENTICATION_FAILED,
                             f"dvara: the server behind {member.proxy} refused the login as "
                             f"{login.db}.{login.name} (has its password changed?); log in "
                             "again")
        except (PoolTimeout, ConnectionFailure) as exc:
            self._checkout_failed(client, frame, exc)
        return None

    def _checkout_failed(self, client: ClientConn, frame: bytes,
                         exc: Union[PoolTimeout, ConnectionFailure]) -> None:
        """Answer the client whose checkout failed (PoolTimeout, ConnectionFailure)."""
        member = client.member
        if isinstance(exc, PoolTimeout):
            member.stats.incr("errors.timeout")
            self._send_error(client, frame, EXCEEDED_TIME_LIMIT, f"dvara: {exc}")
            return
        member.stats.incr("errors.proxy")
        # A refused login is no dead member; dvara_lib.security.login logs it, spaced out.
        login = isinstance(exc, AuthenticationFailure)
        (log.debug if login else log.warning)("cannot connect to %s: %s", member.real, exc)
        if not login:
            self.on_server_failure(member)
            if self.settings.load_balanced:
                # A driver in load-balanced mode takes a network error (not an error
                # reply) as "this router is gone": it drops its connections to it and
                # retries on a new one, which dvara binds to a router that is up.
                client.closing = True
                return
        self._send_error(client, frame, HOST_UNREACHABLE,
                         f"dvara: cannot reach the server behind {member.proxy}"
                         + (" (dvara cannot log in to it)" if login else ""))

    def _send(self, member: "Member", conn: "ServerConnection", frame: bytes) -> bool:
        try:
            conn.send(frame)
            return True
        except ConnectionFailure as exc:
            conn.spoil()
            self._server_failed(member, exc)
            return False

    def _read_reply(self, member: "Member", conn: "ServerConnection",
                    frame: bytes) -> Optional[bytes]:
        """The server's whole reply to frame, or None (conn spoiled) if it failed."""
        try:
            reply = conn.read_frame()
            if wire.response_to(reply) != wire.request_id(frame):
                raise ProtocolError(f"server reply answers {wire.response_to(reply)}, "
                                    f"not {wire.request_id(frame)}")
        except (ConnectionFailure, ProtocolError) as exc:
            conn.spoil()
            self._server_failed(member, exc)
            return None
        if reply.find(b"err") >= 0 and len(reply) < _SCANNED_REPLY_SIZE \
                and _may_say_state_change(reply):
            self._check_state_change(member, reply)
        return reply

    def _stream(self, client: ClientConn, conn: "ServerConnection", frame: bytes,
                reply: bytes, name: Optional[str], compressor: Optional[int],
                start: float) -> Verdict:
        """Relay every reply of an exhaust stream; conn is the stream's until its end."""
        member = client.member
        exhaust = legacy.exhaust_query(frame)
        while True:
            streaming = wire.more_to_come(reply) or (exhaust and legacy.cursor_open(reply))
            if streaming:
                member.stats.incr("replies.streamed")
            if not client.send(self._client_reply(reply, name, compressor)):
                if streaming:
                    conn.spoil()            # the rest of the stream is still coming
                return CLOSE
            if not streaming:
                break
            try:
                reply = conn.read_frame()
            except (ConnectionFailure, ProtocolError) as exc:
                conn.spoil()
                self._server_failed(member, exc)
                return CLOSE
        if client.last_error is not None:
            self.legacy.after_reply(client, conn, reply)
        member.stats.observe("latency", time.monotonic() - start)
        return RESUME

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
        return wire.op_reply([self.topology.rewrite_addresses(d) for d in docs],
                             wire.response_to(reply), flags, cursor_id, starting)

    def _server_failed(self, member: "Member", exc: Exception) -> None:
        """A server connection failed (the caller spoiled it); a network error also
        retires the member's pool and has discovery look at it."""
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

    def _send_error(self, client: ClientConn, frame: bytes, code: int,
                    errmsg: str) -> None:
        """Answer a request the proxy could not relay, in the request's own protocol."""
        if not wire.expects_reply(frame):
            return
        doc = error_doc(code, errmsg, retryable=True)
        op = wire.opcode(frame)
        if op == wire.OP_QUERY and wire.command_name(frame) is not None:
            client.send(wire.op_reply([doc], wire.request_id(frame)))
        elif op in (wire.OP_QUERY, wire.OP_GET_MORE):
            client.send(wire.op_reply([{"$err": errmsg, "code": code}], wire.request_id(frame),
                                      flags=wire.REPLY_QUERY_FAILURE))
        else:
            client.send(wire.reply_like(frame, doc))


def _user_key(client: ClientConn) -> Optional[tuple[str, str]]:
    """The user a client's requests go to the servers as (--auth-passthrough)."""
    login = client.auth.login if client.auth is not None else None
    return None if login is None else login.key


def _may_say_state_change(reply: bytes) -> bool:
    """The reply holds an error field and one of the state-change markers (a scan in C;
    find, not ``in``: ``in`` on bytes first tries its operand as an integer, and the
    TypeError it builds and drops costs more than the scan)."""
    return (reply.find(b"errmsg") >= 0 or reply.find(b"err\x00") >= 0) \
        and any(reply.find(m) >= 0 for m in STATE_CHANGE_MARKERS)


def _streams(reply: bytes) -> bool:
    """An OP_MSG reply with moreToCome: the server will send more replies."""
    return len(reply) > 16 and reply[16] & wire.MORE_TO_COME != 0 \
        and reply[12:16] == _OP_MSG_BYTES


def _unexpected_reply(frame: bytes, reply: bytes) -> str:
    """What is wrong with a reply to a plain request that _relay_plain refused."""
    if not _streams(reply):
        return f"server reply answers {wire.response_to(reply)}, not {wire.request_id(frame)}"
    return "the server streams replies to a request that did not ask for it"


def _sent(ok: bool) -> Verdict:
    return RESUME if ok else CLOSE


def _request_doc(frame: bytes) -> dict[str, Any]:
    if wire.opcode(frame) == wire.OP_MSG:
        return wire.decode_msg_body(frame)
    return wire.decode_query(frame)[4]
