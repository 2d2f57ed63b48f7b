"""The --client-auth-file: the users clients log in as, with salted SCRAM keys, never passwords.

The file is JSON, written by ``dvara adduser`` (mode 0600, replaced atomically)::

    {"version": 1,
     "users": [{"user": "app", "db": "admin", "read_only": false,
                "SCRAM-SHA-256": {"salt": <base64>, "iterations": 15000,
                                  "storedKey": <base64>, "serverKey": <base64>},
                "SCRAM-SHA-1": {...}}]}

Like mongod's ``credentials`` field, a stored key lets nobody log in, but it lets whoever
reads the file try passwords offline and pose as the proxy: keep the file private.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from dvara_lib.address import MONGODB_PORT, parse_option
from dvara_lib.errors import AuthenticationFailure, ConfigError, DvaraError
from dvara_lib.security import scram
from dvara_lib.security.login import credential_from_server

log = logging.getLogger("dvara.auth")

FORMAT_VERSION = 1
_KEYS = ("salt", "storedKey", "serverKey")


@dataclass(frozen=True)
class User:
    """One user of the file."""

    name: str
    db: str
    read_only: bool
    credentials: dict[str, scram.Credential] = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.db, self.name

    @property
    def mechanisms(self) -> list[str]:
        """Mechanisms this user can log in with, the strongest first."""
        return [m for m in scram.MECHANISMS if m in self.credentials]


def make_user(name: str, password: str, db: str = "admin", read_only: bool = False,
              mechanisms: Sequence[str] = scram.MECHANISMS,
              iterations: Optional[int] = None) -> User:
    """A user with fresh salted keys for each mechanism. Can raise ScramError."""
    scram.check_user_name(name)
    creds = {m: scram.make_credential(m, name, password, iterations) for m in mechanisms}
    return User(name, db, read_only, creds)


# -- reading and writing --------------------------------------------------------------

def load(path: str) -> dict[tuple[str, str], User]:
    """Every user of the file, by (db, name). Can raise ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--client-auth-file: {path} does not exist "
                          f"(create it with: dvara adduser NAME --client-auth-file {path})")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--client-auth-file: cannot read {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--client-auth-file %s is readable by other users; chmod 600 it", path)
    try:
        users = [_user_from_json(entry) for entry in _entries(doc)]
    except (KeyError, TypeError, ValueError, scram.ScramError) as exc:
        raise ConfigError(f"--client-auth-file: {path} is not a dvara user file: {exc}") from exc
    return {u.key: u for u in users}


def _entries(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"expected {{\"version\": {FORMAT_VERSION}, \"users\": [...]}}")
    entries = doc.get("users")
    if not isinstance(entries, list):
        raise ValueError("\"users\" must be a list")
    return entries


def _user_from_json(entry: dict[str, Any]) -> User:
    creds = {}
    for mechanism in scram.MECHANISMS:
        c = entry.get(mechanism)
        if c is None:
            continue
        iterations = int(c["iterations"])
        if iterations < scram.MIN_ITERATIONS:
            raise ValueError(f"user {entry['user']!r}: {mechanism} iterations below "
                             f"{scram.MIN_ITERATIONS}")
        salt, stored, server = (scram.unb64(c[k]) for k in _KEYS)
        creds[mechanism] = scram.Credential(mechanism, salt, iterations, stored, server)
    if not creds:
        raise ValueError(f"user {entry.get('user')!r} has no SCRAM credentials")
    return User(str(entry["user"]), str(entry.get("db", "admin")),
                bool(entry.get("read_only", False)), creds)


def _user_to_json(user: User) -> dict[str, Any]:
    out: dict[str, Any] = {"user": user.name, "db": user.db, "read_only": user.read_only}
    for mechanism, c in user.credentials.items():
        out[mechanism] = {"salt": scram.b64(c.salt), "iterations": c.iterations,
                          "storedKey": scram.b64(c.stored_key),
                          "serverKey": scram.b64(c.server_key)}
    return out


def save(path: str, users: dict[tuple[str, str], User]) -> None:
    """Write the file atomically, readable by its owner only. Can raise OSError."""
    doc = {"version": FORMAT_VERSION,
           "users": [_user_to_json(u) for _, u in sorted(users.items())]}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".dvara-users-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class UserFile:
    """The users of --client-auth-file, reloaded when the file changes (checked at logins)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self.users = load(path)

    def _file_stamp(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (0, 0, 0)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def get(self, db: str, name: str) -> Optional[User]:
        """The user (db, name) as the file says now, or None."""
        self._refresh()
        return self.users.get((db, name))

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                users = load(self.path)
            except ConfigError as exc:
                log.error("keeping the previous users: %s", exc)
                return
            self.users = users
            log.info("reloaded %s: %d user(s)", self.path, len(users))


# -- dvara adduser ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dvara adduser",
        description="Add (or replace) a user clients log in to dvara as. The password is "
                    "read from standard input (one line), or prompted for on a terminal; "
                    "only salted SCRAM keys are written.")
    p.add_argument("name", help="the user name")
    p.add_argument("--client-auth-file", required=True, metavar="PATH",
                   help="the user file (created if missing)")
    p.add_argument("--db", default="admin", help="the user's authentication database "
                   "(the client's authSource) [default: admin]")
    p.add_argument("--read-only", action="store_true",
                   help="the user may read but not write [default: read-write]")
    p.add_argument("--mechanisms", default=None,
                   help="comma-separated [default: SCRAM-SHA-256,SCRAM-SHA-1; with "
                        "--from-server, those the server has for the user]")
    p.add_argument("--iterations", type=int, default=None,
                   help="PBKDF2 iterations [default: 15000 for SHA-256, 10000 for SHA-1]")
    p.add_argument("--from-server", metavar="HOST:PORT", default=None,
                   help="log in to this server (plain TCP) as the user with the password, "
                        "and store a verifier with the server's salt and iteration count "
                        "(what --auth-passthrough needs)")
    return p


def read_password(stdin: Any = None) -> str:
    """The new password: prompted twice on a terminal, else the first line of stdin."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the passwords differ")
        return first
    line = stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def adduser_main(argv: Sequence[str]) -> int:
    """``dvara adduser NAME --client-auth-file FILE [--read-only] [--from-server HOST:PORT]``.
    Returns the exit status."""
    args = _parser().parse_args(list(argv))
    try:
        mechanisms = [scram.check_mechanism(m.strip().upper()) for m in
                      (args.mechanisms or ",".join(scram.MECHANISMS)).split(",") if m.strip()]
        if args.from_server and args.iterations:
            raise ConfigError("--iterations: the server's count is used with --from-server")
        password = read_password()
        if not password:
            raise ConfigError("empty password")
        users = load(args.client_auth_file) if os.path.exists(args.client_auth_file) else {}
        if args.from_server:
            user = user_from_server(args, password, mechanisms)
        else:
            user = make_user(args.name, password, args.db, args.read_only, mechanisms,
                             args.iterations)
        replaced = user.key in users
        users[user.key] = user
        save(args.client_auth_file, users)
    except (DvaraError, OSError) as exc:
        print(f"dvara adduser: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'replaced' if replaced else 'added'} {'read-only' if args.read_only else 'read-write'}"
          f" user {args.db}.{args.name} ({', '.join(user.mechanisms)}) in {args.client_auth_file}"
          + (f", matching {args.from_server}" if args.from_server else ""))
    return 0


def user_from_server(args: argparse.Namespace, password: str, mechanisms: list[str]) -> User:
    """The user with verifiers matching the server's (--from-server). Without an explicit
    --mechanisms a mechanism the server refuses is left out (a note on stderr), as long
    as one works. Can raise ConfigError, DvaraError (a refused login, a dead server)."""
    scram.check_user_name(args.name)
    address = parse_option(args.from_server, "--from-server", MONGODB_PORT)
    creds: dict[str, scram.Credential] = {}
    refused: list[str] = []
    for mechanism in mechanisms:
        try:
            creds[mechanism] = credential_from_server(address, args.name, password,
                                                      args.db, mechanism)
        except (AuthenticationFailure, scram.ScramError) as exc:
            if args.mechanisms:
                raise
            refused.append(f"{mechanism}: {exc}")
    if not creds:
        raise ConfigError(f"{args.from_server} refused every login as {args.db}.{args.name}: "
                          + "; ".join(refused))
    for why in refused:
        print(f"dvara adduser: note: left out {why}", file=sys.stderr)
    return User(args.name, args.db, args.read_only, creds)
