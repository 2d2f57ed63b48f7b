"""TLS end to end with test certificates (trustme): clients to dvara, dvara to SecantusDB."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pymongo import MongoClient
from pymongo.errors import ServerSelectionTimeoutError

from dvara_lib import wire
from tests.helpers import Dvara, RawClient, Secantus, free_port, metric_sum, wait_until
from tests.secure_helpers import (Certs, TlsRawClient, adduser, hello_frame, http_get,
                                  make_certs, with_credentials)

FAST = {"serverSelectionTimeoutMS": 3000, "connectTimeoutMS": 3000}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_secantus(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Secantus]:
    """A SecantusDB that speaks TLS only and wants a client certificate."""
    server = Secantus(tmp_path_factory.mktemp("tls-secantus"), None,
                      "--tls-cert-file", str(certs.server_cert),
                      "--tls-key-file", str(certs.server_key),
                      "--tls-ca-file", str(certs.ca), "--tls-require-client-cert")
    yield server
    server.stop()


@pytest.fixture()
def both_sides(tls_secantus: Secantus, certs: Certs,
               start_dvara: Callable[..., Dvara]) -> Callable[..., Dvara]:
    """dvara with TLS to SecantusDB (client certificate) and, with extra flags, to clients."""
    def start(*extra: str) -> Dvara:
        return start_dvara(tls_secantus.address, "--backend-tls",
                           "--backend-tls-ca-file", str(certs.ca),
                           "--backend-tls-cert-file", str(certs.client_pem),
                           "--tls-cert-file", str(certs.server_cert),
                           "--tls-key-file", str(certs.server_key), *extra)
    return start


def tls_client(proxy: Dvara, certs: Certs, **options) -> MongoClient:
    return MongoClient(proxy.uri(tls="true", tlsCAFile=str(certs.ca)), **{**FAST, **options})


def test_the_backend_refuses_plain_connections(tls_secantus: Secantus):
    """So the tests below prove dvara used TLS to reach it."""
    with MongoClient(f"mongodb://{tls_secantus.address}/?directConnection=true",
                     **FAST) as plain:
        with pytest.raises(ServerSelectionTimeoutError):
            plain.admin.command("ping")


def test_pymongo_over_tls_on_both_sides(both_sides: Callable[..., Dvara], certs: Certs):
    admin = f"127.0.0.1:{free_port()}"
    proxy = both_sides("--admin-addr", admin)
    with tls_client(proxy, certs) as c:
        coll = c.tlsdb.docs
        coll.drop()
        coll.insert_many([{"_id": i, "pad": "p" * 1000} for i in range(300)])
        big = "b" * 3_000_000                       # one message of many TLS records
        coll.insert_one({"_id": "big", "big": big})
        assert coll.find_one({"_id": "big"})["big"] == big
        assert len(list(coll.find({"pad": {"$exists": True}}).batch_size(25))) == 300
        assert c.admin.command("replSetGetStatus")["ok"] == 1
        # pymongo's monitor holds an awaitable hello on its own TLS connection meanwhile
        wait_until(lambda: metric_sum(admin, "hello.parked") >= 1,
                   "the monitor's awaitable hello to park")
        assert coll.count_documents({}) == 301
    assert "TLS handshake" not in proxy.log()


def test_pipelined_messages_in_one_tls_write(both_sides: Callable[..., Dvara], certs: Certs):
    """Bytes OpenSSL already decrypted are read even though select() cannot see them."""
    proxy = both_sides()
    raw = TlsRawClient(proxy.port, certs.ca)
    requests = [wire.op_msg({"ping": 1, "$db": "admin"}) for _ in range(20)]
    raw.send(b"".join(requests))
    answered = [wire.response_to(raw.recv_frame()) for _ in requests]
    assert answered == [wire.request_id(r) for r in requests]
    raw.close()


def test_a_plain_client_is_refused_on_a_tls_listener(both_sides: Callable[..., Dvara],
                                                     certs: Certs):
    proxy = both_sides()
    with RawClient(proxy.port) as raw:
        raw.send(hello_frame())
        assert raw.closed_by_peer()
    with MongoClient(proxy.uri(), **FAST) as plain:
        with pytest.raises(ServerSelectionTimeoutError):
            plain.admin.command("ping")
    with tls_client(proxy, certs) as c:                  # TLS clients are still served
        assert c.admin.command("ping")["ok"] == 1
    assert "TLS handshake with a client from 127.0.0.1" in proxy.log()


def test_a_client_certificate_is_required_when_configured(
        both_sides: Callable[..., Dvara], certs: Certs):
    proxy = both_sides("--tls-ca-file", str(certs.ca), "--tls-require-client-cert")
    with tls_client(proxy, certs) as anonymous:
        with pytest.raises(ServerSelectionTimeoutError):
            anonymous.admin.command("ping")
    with tls_client(proxy, certs, tlsCertificateKeyFile=str(certs.other_ca_client_pem)) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")
    with tls_client(proxy, certs, tlsCertificateKeyFile=str(certs.client_pem)) as c:
        assert c.tlsdb.docs.count_documents({}) >= 0


def test_tls_mode_allow_serves_tls_and_plain_on_one_port(
        both_sides: Callable[..., Dvara], certs: Certs):
    proxy = both_sides("--tls-mode", "allow")
    with tls_client(proxy, certs) as secure, MongoClient(proxy.uri(), **FAST) as plain:
        secure.tlsdb.allow.insert_one({"by": "tls"})
        plain.tlsdb.allow.insert_one({"by": "plain"})
        assert {d["by"] for d in secure.tlsdb.allow.find()} >= {"tls", "plain"}
        assert plain.tlsdb.allow.count_documents({}) >= 2
    raw = RawClient(proxy.port)
    assert raw.command({"ping": 1})["ok"] == 1
    raw.close()


def test_a_silent_client_neither_blocks_others_nor_stays(
        both_sides: Callable[..., Dvara], certs: Certs):
    proxy = both_sides("--message-timeout", "1s")
    silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    stalled = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    stalled.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + b"\x01")   # half a ClientHello
    with tls_client(proxy, certs) as c:                  # the acceptor is not waiting on them
        assert c.admin.command("ping")["ok"] == 1
    started = time.monotonic()
    for sock in (silent, stalled):
        sock.settimeout(5)
        assert sock.recv(1) == b""                       # closed after the handshake timeout
        sock.close()
    assert time.monotonic() - started < 4


def test_backend_tls_with_the_wrong_ca_fails_clearly(tls_secantus: Secantus, certs: Certs,
                                                     tmp_path: Path):
    other_ca = tmp_path / "other-ca.pem"
    import trustme
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    proxy = Dvara(tmp_path, tls_secantus.address, "--backend-tls", "--backend-tls-ca-file",
                  str(other_ca), "--backend-tls-cert-file", str(certs.client_pem),
                  "--message-timeout", "3s", wait=False)
    try:
        assert proxy.proc.wait(60) == 1
    finally:
        proxy.stop()
    assert "certificate verify failed" in proxy.log()
    assert "TLS handshake with 127.0.0.1" in proxy.log()


def test_missing_certificate_files_are_config_errors(secantus: Secantus, tmp_path: Path):
    proxy = Dvara(tmp_path, secantus.address, "--tls-cert-file",
                  str(tmp_path / "nope.pem"), wait=False)
    try:
        assert proxy.proc.wait(60) == 2
    finally:
        proxy.stop()
    assert "--tls-cert-file/--tls-key-file: cannot load" in proxy.log()


def test_tls_and_client_logins_together_leak_no_secret(
        both_sides: Callable[..., Dvara], certs: Certs, tmp_path: Path):
    users = tmp_path / "users.json"
    assert adduser(users, "tlsapp", "Tls-App-pw-3141").returncode == 0
    admin = f"127.0.0.1:{free_port()}"
    proxy = both_sides("--client-auth-file", str(users), "--admin-addr", admin,
                       "--log-level", "debug")
    uri = with_credentials(proxy.uri(tls="true", tlsCAFile=str(certs.ca)), "tlsapp",
                           "Tls-App-pw-3141")
    with MongoClient(uri, **FAST) as c:
        assert c.tlsdb.docs.count_documents({}) >= 0
    status = json.loads(http_get(admin, "/status"))
    assert status["config"]["tls_key_file"] == "***"
    key = certs.server_key.read_text().splitlines()[1]      # a line of the private key
    for text in (proxy.log(), json.dumps(status), http_get(admin, "/metrics")):
        assert "Tls-App-pw-3141" not in text and key not in text
    wait_until(lambda: "logged in as admin.tlsapp" in proxy.log(), "the login logged")


def test_tls_client_context_rejects_a_wrong_host(both_sides: Callable[..., Dvara],
                                                 certs: Certs):
    """The proxy's certificate is checked by clients like any server's."""
    proxy = both_sides()
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as plain:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(plain, server_hostname="db.example.com")
