"""A replica set scripted with mockupdb: members whose hellos follow a config the test edits."""

from __future__ import annotations

import threading
from typing import Any, Optional

from bson import ObjectId
from mockupdb import MockupDB

KINDS = ("primary", "secondary", "passive", "arbiter", "hidden", "recovering")


class MockMember:
    """One scripted mongod; answers hello from the set's current config."""

    def __init__(self, rs: "MockReplicaSet") -> None:
        self.rs = rs
        self.server = MockupDB(auto_ismaster=None)
        self.port = self.server.run()
        self.name = f"127.0.0.1:{self.port}"
        self.server.autoresponds(self._respond)

    def _respond(self, request: Any) -> bool:
        name = (getattr(request, "command_name", None) or "").lower()
        if name in ("ismaster", "hello"):
            return request.replies(self.rs.hello_for(self.name))
        if name == "replsetgetstatus":
            return request.replies(self.rs.status_for(self.name))
        return request.replies({"ok": 1.0})

    def stop(self) -> None:
        self.server.stop()


class MockReplicaSet:
    """Members by name, each with a kind (primary, secondary, passive, arbiter, hidden)."""

    def __init__(self, kinds: list[str], set_name: str = "rs") -> None:
        self.set_name = set_name
        self.lock = threading.Lock()
        self.members: dict[str, MockMember] = {}
        self.kinds: dict[str, str] = {}
        self.process_id = ObjectId()
        self.version = 1
        for kind in kinds:
            self.add(kind)

    def add(self, kind: str) -> MockMember:
        member = MockMember(self)
        with self.lock:
            self.members[member.name] = member
            self.kinds[member.name] = kind
            self.version += 1
        return member

    def set_kind(self, name: str, kind: str) -> None:
        with self.lock:
            self.kinds[name] = kind
            self.version += 1

    def remove(self, name: str) -> None:
        """Take a member out of the config (it keeps running, as a removed mongod does)."""
        with self.lock:
            self.kinds.pop(name, None)
            self.version += 1

    def names(self, kind: str) -> list[str]:
        return [n for n, k in self.kinds.items() if k == kind]

    def primary(self) -> Optional[str]:
        found = self.names("primary")
        return found[0] if found else None

    def hello_for(self, name: str) -> dict[str, Any]:
        with self.lock:
            kind = self.kinds.get(name)
            doc: dict[str, Any] = {"ok": 1.0, "maxWireVersion": 17, "minWireVersion": 0,
                                   "maxBsonObjectSize": 16777216,
                                   "maxMessageSizeBytes": 48000000,
                                   "maxWriteBatchSize": 100000,
                                   "logicalSessionTimeoutMinutes": 30}
            if kind is None:
                doc.update(isWritablePrimary=False, secondary=False, isreplicaset=True)
                return doc
            doc.update(self._set_fields(name, kind))
            return doc

    def _set_fields(self, name: str, kind: str) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "setName": self.set_name, "setVersion": self.version, "me": name,
            "hosts": self.names("primary") + self.names("secondary")
            + self.names("recovering"),
            "isWritablePrimary": kind == "primary",
            "secondary": kind in ("secondary", "passive", "hidden"),
        }
        if self.names("passive"):
            fields["passives"] = self.names("passive")
        if self.names("arbiter"):
            fields["arbiters"] = self.names("arbiter")
        if self.primary():
            fields["primary"] = self.primary()
        if kind == "arbiter":
            fields["arbiterOnly"] = True
        if kind == "passive":
            fields["passive"] = True
        if kind == "hidden":
            fields.update(hidden=True, passive=True)
        if kind == "recovering":
            fields["secondary"] = False
        return fields

    def status_for(self, name: str) -> dict[str, Any]:
        with self.lock:
            members = [{"_id": i, "name": n, "stateStr": k.upper(), "self": n == name,
                        "syncSourceHost": self.primary() if k == "secondary" else ""}
                       for i, (n, k) in enumerate(self.kinds.items())]
            return {"set": self.set_name, "members": members,
                    "syncSourceHost": self.primary() or "", "ok": 1.0}

    def stop(self) -> None:
        for member in self.members.values():
            member.stop()
