"""One client message on its way down the chain of steps that handle it.

# design:
# The usual message (a flag-less OP_MSG command to a modern member, from a client with no
# login gate, pin or legacy state) takes the relay's fast path and is never decoded
# here. Any other message is read once into a ``Message`` (decompressed, its OP_MSG flags
# checked, its command name found) and handed down a fixed chain of steps: the login
# gate (dvara_lib.proxy.gate), legacy getLastError (dvara_lib.proxy.legacy), the hello
# answer, and last the relay to a server. Each step either handles the message, and says
# what becomes of the client (an ``Outcome``), or passes it on (``PASS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

from dvara_lib import wire
from dvara_lib.errors import ProtocolError
from dvara_lib.proxy.client import ClientConn, ParkedHello, Verdict

#: What handling one message comes to: go on (RESUME), close, or park a hello.
Outcome = Union[Verdict, ParkedHello]
#: A step's answer when the message is for the next step.
PASS = None
#: One step of the chain: an Outcome once it handled the message, else PASS.
Step = Callable[[ClientConn, "Message"], Optional[Outcome]]


@dataclass(frozen=True)
class Message:
    """One whole request: its frame (decompressed), opcode, command name (None for a
    legacy operation) and the compressor its reply must use (None: uncompressed)."""

    __slots__ = ("frame", "op", "name", "compressor")
    frame: bytes
    op: int
    name: Optional[str]
    compressor: Optional[int]

    @classmethod
    def read(cls, frame: bytes) -> "Message":
        """Can raise ProtocolError (an unknown opcode, bad flags, a bad compression)."""
        compressor: Optional[int] = None
        op = wire.opcode(frame)
        if op == wire.OP_COMPRESSED:
            frame, compressor = wire.decompress(frame)
            op = wire.opcode(frame)
        if op not in wire.KNOWN_REQUEST_OPCODES or op == wire.OP_COMPRESSED:
            raise ProtocolError(f"unsupported opcode {op}")
        if op == wire.OP_MSG:
            frame = wire.check_msg_flags(frame)
        return cls(frame, op, wire.command_name(frame), compressor)
