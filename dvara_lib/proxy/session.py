"""What the proxy keeps on a client between its messages: its login and its last error.

# design:
# Per-client state lives on the ClientConn and is touched only by the thread that owns
# the client (the acceptor, or the one worker serving it). The gate
# (dvara_lib.proxy.gate) keeps a ``ClientAuth`` in ``client.auth``; the legacy half of
# the relay (dvara_lib.proxy.legacy) keeps a ``LastError`` in ``client.last_error``.
# Both types live here, below the modules that use them, so that the client need not
# import the gate or legacy (and they need not import each other).
"""

from __future__ import annotations

from typing import Any, Optional

from dvara_lib import wire
from dvara_lib.security.login import UserLogin
from dvara_lib.security.scram import ScramServer
from dvara_lib.security.userfile import User


class ClientAuth:
    """One client's login state (``client.auth``)."""

    __slots__ = ("user", "read_only", "conversation", "pending", "skip_empty", "as_text",
                 "speculative", "login")

    def __init__(self) -> None:
        self.user: Optional[User] = None       # logged in as
        self.read_only = False
        self.conversation: Optional[ScramServer] = None
        self.pending: Optional[User] = None    # the user the conversation is about
        self.skip_empty = False
        self.as_text = False                   # the client sends base64 strings
        self.speculative = False               # the conversation began inside hello
        self.login: Optional[UserLogin] = None  # --auth-passthrough: its own server login


class LastError:
    """What the proxy knows of one client's last error (mongod's per-connection LastError).

    ``reply``: the server's OP_REPLY to the getLastError that followed the client's latest
    write, once relayed (None: no write yet, or its outcome is unknown). ``nprev``:
    messages since that write, counted as mongod counts them (1: it was the last one).
    ``pending``: that write's outcome is still on the pinned server connection, unasked.
    ``after``: what to do with the reply of the message being relayed.
    """

    __slots__ = ("reply", "nprev", "pending", "after")

    def __init__(self) -> None:
        self.reply: Optional[bytes] = None
        self.nprev = 1
        self.pending = False
        self.after: Optional[str] = None

    def wrote(self) -> None:
        self.reply, self.nprev, self.pending = None, 1, True

    def operation(self) -> None:
        """Any message but the few mongod does not count: the write is no longer the last."""
        self.nprev += 1
        self.pending = False

    def reset(self) -> None:
        self.reply, self.nprev, self.pending = None, 1, False

    def failed(self, connection_id: int, reply: bytes) -> None:
        """A query failed: mongod's uassert made its error the last error."""
        failure = wire.reply_document(reply)
        doc: dict[str, Any] = {"err": str(failure.get("$err", ""))}
        if failure.get("code"):
            doc["code"] = failure["code"]
        doc.update(n=0, connectionId=connection_id, ok=1.0)
        self.reply, self.nprev, self.pending = wire.op_reply([doc], 0), 1, False
