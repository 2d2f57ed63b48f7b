"""A test mongos router: answers hello itself as a router does, relays the rest to a server.

Run as a script (a real process the tests can SIGKILL):

    python tests/router_peer.py --port P --backend 127.0.0.1:Q --name r1 --log FILE

# design:
# No mongos runs on the test machines, so this plays one: it listens on 127.0.0.1:P,
# answers hello/isMaster itself (``msg: "isdbgrid"``, writable, its own connectionId and
# topologyVersion, the limits and wire versions of the server behind it, and no hosts,
# set name or primary) and relays every other message, as bytes, to the server behind
# it (a SecantusDB that several routers share, as real routers share the shards), over
# one server connection per client connection, so the server's cursors, sessions and
# transactions work through it. Each relayed request is logged, one JSON line per
# request in FILE ({"router", "cmd", "txn": whether it has a txnNumber, "cursor" for a
# getMore}), so a test can tell which router served what. One thread per client
# connection.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import bson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dvara_lib import wire  # noqa: E402
from dvara_lib.errors import ConnectionFailure, ProtocolError, ServerTimeout  # noqa: E402

HELLO_NAMES = ("hello", "isMaster", "ismaster")
#: What a router takes from the hello of the server behind it.
COPIED = ("maxBsonObjectSize", "maxMessageSizeBytes", "maxWriteBatchSize", "maxWireVersion",
          "minWireVersion", "logicalSessionTimeoutMinutes")


class Router:
    """A listener that answers hellos and relays the rest to backend."""

    def __init__(self, port: int, backend: tuple[str, int], name: str, log: Path) -> None:
        self.backend = backend
        self.name = name
        self._log = open(log, "a", buffering=1)
        self._log_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.template = self._template()
        self.listener = socket.create_server(("127.0.0.1", port))

    def _template(self) -> dict[str, Any]:
        with socket.create_connection(self.backend, timeout=10) as sock:
            real = wire.round_trip(sock, wire.op_msg({"hello": 1, "$db": "admin"}))
        doc: dict[str, Any] = {key: real[key] for key in COPIED if key in real}
        doc.update(msg="isdbgrid", topologyVersion={"processId": bson.ObjectId(),
                                                    "counter": 0})
        return doc

    def serve(self) -> None:
        print(f"router {self.name} ready on {self.listener.getsockname()[1]}", flush=True)
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._client, args=(client,), daemon=True).start()

    def _client(self, client: socket.socket) -> None:
        server: Optional[socket.socket] = None
        connection_id = next(self._ids)
        try:
            while True:
                frame = wire.read_frame(client)
                name = wire.command_name(frame)
                if name in HELLO_NAMES:
                    wire.send_all(client, wire.reply_like(frame, self._hello(name, connection_id)))
                    continue
                if server is None:
                    server = socket.create_connection(self.backend, timeout=30)
                self._record(frame, name)
                self._relay(frame, client, server)
        except (ConnectionFailure, ServerTimeout, ProtocolError, OSError):
            pass
        finally:
            for sock in (client, server):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _hello(self, name: str, connection_id: int) -> dict[str, Any]:
        doc = dict(self.template)
        doc["isWritablePrimary" if name == "hello" else "ismaster"] = True
        doc.update(connectionId=connection_id, ok=1.0,
                   localTime=datetime.datetime.now(datetime.timezone.utc))
        return doc

    @staticmethod
    def _relay(frame: bytes, client: socket.socket, server: socket.socket) -> None:
        wire.send_all(server, frame)
        if not wire.expects_reply(frame):
            return
        while True:
            reply = wire.read_frame(server)
            wire.send_all(client, reply)
            if not wire.more_to_come(reply):
                return

    def _record(self, frame: bytes, name: Optional[str]) -> None:
        entry: dict[str, Any] = {"router": self.name, "cmd": name}
        if wire.opcode(frame) == wire.OP_MSG:
            body = wire.decode_msg_body(frame)
            entry["txn"] = "txnNumber" in body
            if name == "getMore":
                entry["cursor"] = int(body["getMore"])
        with self._log_lock:
            self._log.write(json.dumps(entry) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every request the routers logging to path relayed, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    host, _, port = args.backend.rpartition(":")
    Router(args.port, (host, int(port)), args.name, args.log).serve()


if __name__ == "__main__":
    main()
