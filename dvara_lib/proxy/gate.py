"""The gate clients log in through: the proxy as a SCRAM server, and what a login allows.

# design:
# With --client-auth-file the ``Gate`` makes the proxy a SCRAM server. A client's login
# state lives on its ClientConn (``client.auth``), touched only by the thread that owns
# the client. The relay asks ``Gate.check`` about every message before relaying it: one
# set lookup and two attribute reads for a logged-in read-write user. The gate answers
# saslStart/saslContinue itself (and the speculativeAuthenticate of a hello, through
# ``on_hello``) and never relays an authentication command: pooled server connections
# are logged in as the proxy (dvara_lib.security.login) and shared by every client.
# With --auth-passthrough the gate keeps the ClientKey a client's proof reveals
# (``client.auth.login``, in memory only), the relay then takes server connections logged
# in as that user (dvara_lib.backend.userpool), and the read-only allow-list is off: the
# servers' roles decide. Such a client is not handed over on a restart (``login_of``).
# With --auth-query (which needs --auth-passthrough) a user the file lacks is looked up
# on the servers (dvara_lib.security.authquery, cached for --auth-query-cache) in the
# worker thread serving the saslStart, through the client's member; a lookup that fails
# answers AuthenticationFailed with a reason, an unknown user gets the decoy
# conversation; a changed verifier clears that user's server connections everywhere.
# Without --client-auth-file but with --username, a gate still stands, only to refuse
# client logins that would otherwise reach the shared connections. Failed logins are
# counted per client IP; past --auth-failure-limit in a minute that IP's logins are
# refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from bson.binary import Binary

from dvara_lib import wire
from dvara_lib.security import scram
from dvara_lib.proxy.client import Verdict
from dvara_lib.proxy.session import ClientAuth
from dvara_lib.errors import (AUTHENTICATION_FAILED, COMMAND_NOT_FOUND, MECHANISM_UNAVAILABLE,
                              UNAUTHORIZED, AuthQueryFailure, error_doc)
from dvara_lib.security.authquery import Key, VerifierCache, users_info_command
from dvara_lib.security.login import UserLogin
from dvara_lib.security.userfile import User, UserFile

if TYPE_CHECKING:
    from dvara_lib.backend.topology import Member
    from dvara_lib.proxy.client import ClientConn
    from dvara_lib.proxy.message import Message
    from dvara_lib.config import Settings

log = logging.getLogger("dvara.gate")

#: Runs a command (in a database) on a member as the proxy's account; returns the reply.
RunCommand = Callable[["Member", dict[str, Any], str], dict[str, Any]]


#: Commands the gate always answers itself; none is ever relayed.
AUTH_COMMANDS = frozenset({"saslStart", "saslContinue", "authenticate", "getnonce", "logout"})
#: What mongod runs before a login (its commands with requiresAuth() false).
PRE_AUTH_COMMANDS = frozenset({"hello", "isMaster", "ismaster", "ping", "buildInfo",
                               "buildinfo"})
#: What a read-only user may run: an allow-list, so unknown and new commands are refused.
READ_COMMANDS = frozenset({
    "find", "getMore", "killCursors", "aggregate", "count", "distinct", "mapReduce",
    "mapreduce", "explain", "listCollections", "listIndexes", "listDatabases", "dbStats",
    "dbstats", "collStats", "collstats", "dataSize", "datasize", "geoNear", "geoSearch",
    "hello", "isMaster", "ismaster", "ping", "buildInfo", "buildinfo", "serverStatus",
    "hostInfo", "whatsmyuri", "connectionStatus", "getParameter", "getCmdLineOpts",
    "listCommands", "replSetGetStatus", "replSetGetConfig", "currentOp", "usersInfo",
    "rolesInfo", "getLastError", "getlasterror", "getPrevError", "getpreverror",
    "resetError", "reseterror", "startSession", "endSessions", "refreshSessions",
    "commitTransaction", "abortTransaction", "features", "getLog",
})
_READ_OPCODES = frozenset({wire.OP_QUERY, wire.OP_GET_MORE, wire.OP_KILL_CURSORS})
_WRITE_STAGES = ("$out", "$merge")


def login_of(client: "ClientConn") -> Any:
    """For a graceful restart: None (no login), [db, user] (logged in), or False (a login
    conversation is under way and cannot move)."""
    state = client.auth
    if state is None or (state.user is None and state.conversation is None):
        return None
    if state.conversation is not None or state.user is None or state.login is not None:
        return False                          # a ClientKey never leaves this process
    return [state.user.db, state.user.name]


def restore_login(client: "ClientConn", login: Any, gate: Optional["Gate"]) -> bool:
    """Log a handed-over client in again as the user it was; False if that user is gone."""
    if not login:
        return True
    user = gate.users.get(*login) if gate is not None and gate.users is not None else None
    if user is None:
        return False
    state = client.auth = ClientAuth()
    state.user, state.read_only = user, user.read_only
    return True


class FailureLimiter:
    """Failed logins per client IP in the current minute. Thread-safe."""

    def __init__(self, limit: int, window: float = 60.0, max_ips: int = 10000) -> None:
        self.limit = limit
        self.window = window
        self.max_ips = max_ips
        self._lock = threading.Lock()
        self._counts: dict[str, list[float]] = {}   # ip -> [window start, failures]

    def blocked(self, ip: str) -> bool:
        entry = self._counts.get(ip)
        return (entry is not None and entry[1] >= self.limit
                and time.monotonic() - entry[0] < self.window)

    def failed(self, ip: str) -> int:
        """Count one failure; returns the failures of ip in its current window."""
        now = time.monotonic()
        with self._lock:
            entry = self._counts.get(ip)
            if entry is None or now - entry[0] >= self.window:
                if len(self._counts) >= self.max_ips:
                    self._prune(now)
                entry = self._counts[ip] = [now, 0]
            entry[1] += 1
            return int(entry[1])

    def _prune(self, now: float) -> None:
        for ip in [ip for ip, e in self._counts.items() if now - e[0] >= self.window]:
            del self._counts[ip]
        while len(self._counts) >= self.max_ips:
            del self._counts[next(iter(self._counts))]


class Gate:
    """What clients may do before and after logging in.

    Methods for the relay: check() before relaying a message, on_hello() on every hello
    answer the proxy builds.
    """

    def __init__(self, users: Optional[UserFile], failure_limit: int,
                 passthrough: bool = False, query: Optional[VerifierCache] = None,
                 run_command: Optional[RunCommand] = None) -> None:
        self.users = users                     # the --client-auth-file, or None
        self.limiter = FailureLimiter(failure_limit)
        self.passthrough = passthrough         # keep each client's ClientKey (in memory)
        self.query = query                     # --auth-query, with run_command
        self.run_command = run_command
        self.takes_logins = users is not None or query is not None
        self._decoy_key = os.urandom(32)

    @classmethod
    def from_settings(cls, settings: "Settings", run_command: Optional[RunCommand] = None,
                      on_change: Callable[[Key], None] = lambda key: None
                      ) -> Optional["Gate"]:
        """The gate settings ask for, or None. Can raise ConfigError (a bad user file).
        run_command and on_change serve --auth-query (see VerifierCache)."""
        users = UserFile(settings.client_auth_file) if settings.client_auth_file else None
        query = None
        if settings.auth_query and run_command is not None:
            query = VerifierCache(settings.auth_query_cache, on_change)
        if users is not None or query is not None:
            return cls(users, settings.auth_failure_limit, settings.auth_passthrough,
                       query, run_command)
        if settings.username:
            return cls(None, settings.auth_failure_limit)
        return None

    def _user(self, client: "ClientConn", db: str, name: str) -> Optional[User]:
        """The user of the file, else (--auth-query) as the servers hold it; None if
        unknown. Can raise AuthQueryFailure."""
        user = self.users.get(db, name) if self.users is not None else None
        if user is not None or self.query is None or self.run_command is None:
            return user
        run, member = self.run_command, client.member
        return self.query.get(db, name, lambda: run(member, users_info_command(db, name), db))

    # -- every message -------------------------------------------------------------------
    def check(self, client: "ClientConn", msg: "Message") -> Optional[Verdict]:
        """A step of the message chain: PASS (None) lets the message go on; else it was
        answered here, and this is the verdict on the client. Can raise ProtocolError.
        """
        frame, op, name, compressor = msg.frame, msg.op, msg.name, msg.compressor
        if name in AUTH_COMMANDS:
            return self._auth_command(client, frame, name, compressor)
        if not self.takes_logins:
            return None
        state = client.auth
        if state is None or state.user is None:
            if name in PRE_AUTH_COMMANDS:
                return None
            return self._refuse(client, frame, op, name, compressor,
                                f"command {name or _op_name(op)} requires authentication")
        if state.login is not None and self.query is not None \
                and not self.query.is_current(state.login.key, state.login.credential):
            client.auth = None                # logged in with a verifier now replaced
            log.info("logged %s out: the verifier of %s.%s changed on the servers", client,
                     state.user.db, state.user.name)
            return self._refuse(client, frame, op, name, compressor, "dvara: the password of "
                                f"{state.user.db}.{state.user.name} changed on the servers; "
                                "log in again", AUTHENTICATION_FAILED)
        if state.read_only and not _may_read(op, name, frame):
            return self._refuse(client, frame, op, name, compressor,
                                f"dvara: user {state.user.db}.{state.user.name} is read-only: "
                                f"not authorized to execute command {name or _op_name(op)}")
        return None

    def _refuse(self, client: "ClientConn", frame: bytes, op: int, name: Optional[str],
                compressor: Optional[int], errmsg: str, code: int = UNAUTHORIZED) -> Verdict:
        """Answer Unauthorized (or code); a message that expects no reply closes the
        client."""
        if not wire.expects_reply(frame):
            log.info("closing %s: %s (the message expects no reply)", client, errmsg)
            return Verdict.CLOSE
        if op == wire.OP_MSG or name is not None:
            return _reply(client, frame, error_doc(code, errmsg), compressor)
        reply = wire.op_reply([{"$err": errmsg, "code": code}], wire.request_id(frame),
                              flags=wire.REPLY_QUERY_FAILURE)
        return _send(client, reply, compressor)

    # -- hello ---------------------------------------------------------------------------
    def on_hello(self, client: "ClientConn", request: dict[str, Any], doc: dict[str, Any]) -> None:
        """Add saslSupportedMechs and the speculativeAuthenticate reply to a hello answer."""
        if not self.takes_logins:
            return
        asked = request.get("saslSupportedMechs")
        if isinstance(asked, str) and "." in asked:
            db, _, name = asked.partition(".")
            user = self.users.get(db, name) if self.users is not None else None
            doc["saslSupportedMechs"] = user.mechanisms if user else list(scram.MECHANISMS)
        spec = request.get("speculativeAuthenticate")
        if isinstance(spec, dict) and "saslStart" in spec:
            answer = self._speculate(client, spec)
            if answer is not None:
                doc["speculativeAuthenticate"] = answer

    def _speculate(self, client: "ClientConn", spec: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The first step of a login inside hello; None (no answer) if it cannot start.
        The driver then logs in the usual way, which reports the failure."""
        if self.limiter.blocked(client.peer_ip):
            return None
        try:
            answer = self._start(client, spec, str(spec.get("db") or "admin"))
            client.auth.speculative = True
            return answer
        except (scram.ScramError, AuthQueryFailure):
            state = client.auth
            if state is not None:
                state.conversation = state.pending = None
            return None

    # -- saslStart / saslContinue ------------------------------------------------------
    def _auth_command(self, client: "ClientConn", frame: bytes, name: str,
                      compressor: Optional[int]) -> Verdict:
        request, db = _request(frame)
        if name == "logout":
            if client.auth is not None:
                client.auth = None
            return _reply(client, frame, {"ok": 1.0}, compressor)
        if not self.takes_logins:
            return _reply(client, frame, error_doc(
                AUTHENTICATION_FAILED, "dvara takes no client logins here (it has no "
                "--client-auth-file): connect without credentials"), compressor)
        if name == "getnonce":
            return _reply(client, frame, error_doc(
                COMMAND_NOT_FOUND, "no such command: getnonce (MONGODB-CR is not supported)"),
                compressor)
        if name == "authenticate":
            return _reply(client, frame, error_doc(
                MECHANISM_UNAVAILABLE, f"dvara: mechanism {request.get('mechanism', 'MONGODB-CR')}"
                f" is not supported; use SCRAM-SHA-256 or SCRAM-SHA-1"), compressor)
        if self.limiter.blocked(client.peer_ip):
            return _reply(client, frame, error_doc(
                AUTHENTICATION_FAILED, "Authentication failed: too many failed logins from "
                f"{client.peer_ip}; try again later"), compressor)
        try:
            if name == "saslStart":
                doc = self._start(client, request, db)
            else:
                doc = self._continue(client, request)
        except scram.ScramError as exc:
            return self._login_failed(client, frame, compressor, str(exc))
        except AuthQueryFailure as exc:
            return self._lookup_failed(client, frame, compressor, exc)
        return _reply(client, frame, {**doc, "ok": 1.0}, compressor)

    def _start(self, client: "ClientConn", request: dict[str, Any], db: str) -> dict[str, Any]:
        """Begin a conversation (saslStart or speculativeAuthenticate). Can raise ScramError."""
        mechanism = request.get("mechanism")
        if mechanism not in scram.MECHANISMS:
            raise scram.ScramError(f"mechanism {mechanism!r} is not supported")
        state = client.auth = client.auth or ClientAuth()
        state.as_text = isinstance(request.get("payload"), str)
        client_first = scram.payload_bytes(request.get("payload"))
        user = self._user(client, db, scram.ScramServer.user_of(client_first))
        credential = user.credentials.get(mechanism) if user else None
        state.conversation = scram.ScramServer(mechanism, credential, self._decoy,
                                               keep_client_key=self.passthrough)
        state.pending = user if credential else None
        options = request.get("options")
        state.skip_empty = isinstance(options, dict) and bool(options.get("skipEmptyExchange"))
        state.speculative = False
        server_first = state.conversation.first(client_first)
        return {"conversationId": 1, "done": False, "payload": self._out(state, server_first)}

    def _continue(self, client: "ClientConn", request: dict[str, Any]) -> dict[str, Any]:
        state = client.auth
        conversation = state.conversation if state is not None else None
        if conversation is None or request.get("conversationId", 1) != 1:
            raise scram.ScramError("no SASL conversation in progress on this connection")
        payload = scram.payload_bytes(request.get("payload", b""))
        if conversation.done:                 # the client's empty last step
            state.conversation = None
            return {"conversationId": 1, "done": True, "payload": self._out(state, b"")}
        server_final = conversation.final(payload)
        user = state.pending
        state.user, state.read_only, state.pending = user, user.read_only, None
        if self.passthrough:                  # mongod decides what the user may do
            state.read_only = False
            state.login = _user_login(user, conversation)
        log.debug("%s logged in as %s.%s (%s%s)", client, user.db, user.name,
                  conversation.mechanism, ", speculative" if state.speculative else "")
        if state.skip_empty:
            state.conversation = None
        return {"conversationId": 1, "done": state.skip_empty,
                "payload": self._out(state, server_final)}

    def _login_failed(self, client: "ClientConn", frame: bytes, compressor: Optional[int],
                      why: str) -> Verdict:
        state = client.auth
        who = "?"
        if state is not None:
            if state.conversation is not None and state.conversation.username is not None:
                who = state.conversation.username
            state.conversation = state.pending = None
        count = self.limiter.failed(client.peer_ip)
        if count & (count - 1) == 0 or count == self.limiter.limit:
            blocked = " (now refused for a while)" if count >= self.limiter.limit else ""
            log.warning("client login failed from %s as %r: %s (%d failure(s) from that "
                        "address this minute)%s", client.peer_ip, who, why, count, blocked)
        return _reply(client, frame, error_doc(AUTHENTICATION_FAILED, "Authentication failed."),
                      compressor)

    def _lookup_failed(self, client: "ClientConn", frame: bytes, compressor: Optional[int],
                       exc: AuthQueryFailure) -> Verdict:
        """--auth-query could not look the user up: not the client's fault, not counted."""
        state = client.auth
        if state is not None:
            state.conversation = state.pending = None
        log.warning("cannot check a login of %s: the user lookup on %s failed: %s", client,
                    client.member.real, exc)
        return _reply(client, frame, error_doc(
            AUTHENTICATION_FAILED, "Authentication failed: dvara cannot look the user up "
            "on the servers now; try again later"), compressor)

    def _decoy(self, username: str) -> bytes:
        """Stable made-up bytes for an unknown user's salt (unknown looks like a wrong
        password, and asks again get the same salt)."""
        return hmac.new(self._decoy_key, username.encode("utf-8"), hashlib.sha256).digest()

    @staticmethod
    def _out(state: ClientAuth, data: bytes) -> Any:
        return scram.b64(data) if state.as_text else Binary(data)


# -- helpers --------------------------------------------------------------------------

def _user_login(user: User, conversation: scram.ScramServer) -> UserLogin:
    """The user's own server login from the conversation that just succeeded; the
    conversation lets go of the ClientKey."""
    key, conversation.client_key = conversation.client_key, None
    assert key is not None and conversation.credential is not None
    return UserLogin(user.db, user.name, conversation.credential, key)


def _may_read(op: int, name: Optional[str], frame: bytes) -> bool:
    """Whether a read-only user may send this message."""
    if name is None:
        return op in _READ_OPCODES
    if name not in READ_COMMANDS:
        return False
    if name == "aggregate" or name in ("mapReduce", "mapreduce"):
        return not _writes_output(name, _request(frame)[0])
    return True


def _writes_output(name: str, request: dict[str, Any]) -> bool:
    """An aggregate with $out/$merge, or a mapReduce not returning its result inline."""
    if name == "aggregate":
        stages = request.get("pipeline") or []
        return any(isinstance(s, dict) and any(k in s for k in _WRITE_STAGES) for s in stages)
    out = request.get("out")
    return not (isinstance(out, dict) and "inline" in out)


def _request(frame: bytes) -> tuple[dict[str, Any], str]:
    """(command document, its database). Can raise ProtocolError."""
    if wire.opcode(frame) == wire.OP_MSG:
        doc = wire.decode_msg_body(frame)
        return doc, str(doc.get("$db", "admin"))
    _, ns, _, _, doc = wire.decode_query(frame)
    return doc, ns.split(".", 1)[0]


def _reply(client: "ClientConn", frame: bytes, doc: dict[str, Any],
           compressor: Optional[int]) -> Verdict:
    return _send(client, wire.reply_like(frame, doc), compressor)


def _send(client: "ClientConn", reply: bytes, compressor: Optional[int]) -> Verdict:
    if compressor is not None:
        reply = wire.compress(reply, compressor)
    return Verdict.RESUME if client.send(reply) else Verdict.CLOSE


def _op_name(op: int) -> str:
    return {wire.OP_QUERY: "query", wire.OP_GET_MORE: "getMore", wire.OP_INSERT: "insert",
            wire.OP_UPDATE: "update", wire.OP_DELETE: "delete",
            wire.OP_KILL_CURSORS: "killCursors"}.get(op, f"opcode {op}")
