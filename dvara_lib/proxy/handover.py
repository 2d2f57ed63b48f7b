"""A client between two messages, described so that another process can serve it on.

# design:
# When dvara restarts into new code (or a worker process stops), each client that is
# between two messages moves to the new process with everything it carries: its member,
# the bytes already read of its next message, its compressors, a parked hello, its login
# and its legacy last error. The acceptor describes a client (``describe``) and hands
# the description with the socket to a ``ClientSink``; the receiving acceptor reads it
# back (``decode``). How the bytes and the socket travel between processes is the
# process package's business (dvara_lib.process.handoff).
"""

from __future__ import annotations

import base64
import json
import socket
from typing import TYPE_CHECKING, Any, Optional, Protocol

from dvara_lib.proxy import gate, legacy

if TYPE_CHECKING:
    from dvara_lib.proxy.client import ClientConn

#: Clients with more unread bytes than this are not moved (closed between messages).
MAX_BUFFERED = 1024 * 1024


class ClientSink(Protocol):
    """Where a draining acceptor sends the clients it lets go."""

    def send_client(self, sock: socket.socket, meta: bytes) -> bool:
        """Move one client's socket with its description; False if that failed."""


def describe(client: "ClientConn") -> Optional[bytes]:
    """client as JSON, or None if it cannot move: a TLS session, a login half done or a
    large unread message lives in this process only."""
    login = gate.login_of(client)
    if len(client.buf) > MAX_BUFFERED or client.closing or client.reader is not None \
            or login is False:
        return None
    parked = client.parked
    parked_meta = None if parked is None else {
        "frame": base64.b64encode(parked.frame).decode(), "command": parked.command,
        "exhaust": parked.exhaust}
    return json.dumps({
        "member": client.member.real, "peer": list(client.peer[:2]),
        "buf": base64.b64encode(bytes(client.buf)).decode(),
        "compressors": client.compressors, "parked": parked_meta, "login": login,
        "last_error": legacy.describe(client.last_error)}).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A description back as a dict; ``buf`` as bytes, a parked hello's ``frame`` too."""
    meta = json.loads(data)
    meta["buf"] = base64.b64decode(meta["buf"])
    if meta.get("parked"):
        meta["parked"]["frame"] = base64.b64decode(meta["parked"]["frame"])
    return meta
