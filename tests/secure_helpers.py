"""Helpers for the authentication and TLS tests: a SecantusDB with --auth, users made
with ``dvara adduser``, raw SCRAM logins, test certificates (trustme), raw TLS clients."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import trustme
from bson.binary import Binary
from pymongo import MongoClient

from dvara_lib import wire
from dvara_lib.security import scram
from tests.helpers import ROOT, RawClient, Secantus, free_port


def secured_secantus(tmp: Path, users: dict[str, str], *extra: str,
                     roles: Optional[dict[str, list[str]]] = None) -> Secantus:
    """A SecantusDB that requires logins (--auth), with users {name: password} (role root,
    or roles[name]) who can log in with SCRAM-SHA-256 and SCRAM-SHA-1 (SecantusDB's default
    is SHA-256 only).

    As test-backends.md says: users are made without --auth on a data folder, then the
    server is restarted with --auth on the same folder.
    """
    data = tmp / "secantus-data"
    port = free_port()
    first = Secantus(tmp, port, "--storage-path", str(data))
    try:
        with MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true") as direct:
            for name, password in users.items():
                direct.admin.command("createUser", name, pwd=password,
                                     roles=(roles or {}).get(name, ["root"]),
                                     mechanisms=list(scram.MECHANISMS))
    finally:
        first.stop()
    return Secantus(tmp, port, "--storage-path", str(data), "--auth", *extra)


def adduser(path: Path, name: str, password: str, *flags: str) -> subprocess.CompletedProcess:
    """Run ``python dvara.py adduser NAME --client-auth-file PATH`` with the password on stdin."""
    return subprocess.run([sys.executable, str(ROOT / "dvara.py"), "adduser", name,
                           "--client-auth-file", str(path), *flags],
                          input=password + "\n", capture_output=True, text=True, timeout=60)


def with_credentials(uri: str, user: str, password: str, **options: Any) -> str:
    """The proxy's URI with user:password@ and extra options."""
    uri = uri.replace("mongodb://", f"mongodb://{user}:{password}@", 1)
    return uri + "".join(f"&{k}={v}" for k, v in options.items())


def raw_login(raw: RawClient, user: str, password: str,
              mechanism: str = scram.SHA256, db: str = "admin") -> dict[str, Any]:
    """Log a raw connection in with saslStart/saslContinue; returns the last reply."""
    client = scram.ScramClient(mechanism, user, password)
    reply = raw.command({"saslStart": 1, "mechanism": mechanism,
                         "payload": Binary(client.first()),
                         "options": {"skipEmptyExchange": True}}, db)
    if not reply.get("ok"):
        return reply
    final = client.final(bytes(reply["payload"]))
    reply = raw.command({"saslContinue": 1, "conversationId": reply["conversationId"],
                         "payload": Binary(final)}, db)
    if reply.get("ok"):
        client.verify(bytes(reply["payload"]))
    return reply


def http_get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as resp:
        return resp.read().decode()


# -- certificates -----------------------------------------------------------------------

@dataclass
class Certs:
    """PEM files from a test CA: a server certificate for 127.0.0.1/localhost, a client
    certificate, and a second CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    server_pem: Path          # certificate and key in one file
    client_pem: Path
    other_ca_client_pem: Path


def make_certs(directory: Path) -> Certs:
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example.com")
    stranger = other.issue_cert("client.example.com")
    paths = Certs(*(directory / name for name in (
        "ca.pem", "server.crt", "server.key", "server.pem", "client.pem", "stranger.pem")))
    ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.server_cert))
    server.private_key_pem.write_to_path(str(paths.server_key))
    server.private_key_and_cert_chain_pem.write_to_path(str(paths.server_pem))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths.client_pem))
    stranger.private_key_and_cert_chain_pem.write_to_path(str(paths.other_ca_client_pem))
    return paths


class TlsRawClient(RawClient):
    """A RawClient over TLS."""

    def __init__(self, port: int, ca: Path, cert: Optional[Path] = None,
                 timeout: float = 10.0) -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert))
        plain = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(plain, server_hostname="127.0.0.1")


def hello_frame() -> bytes:
    return wire.op_msg({"hello": 1, "$db": "admin"})
