"""Authentication end to end: dvara logs in to a SecantusDB started with --auth, and with
--client-auth-file clients must log in to dvara (SCRAM-SHA-256 and SCRAM-SHA-1)."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from bson.binary import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from dvara_lib import wire
from dvara_lib.security import scram
from dvara_lib.config import parse_args
from tests.helpers import Dvara, RawClient, Secantus, free_port, wait_until
from tests.secure_helpers import (adduser, http_get, raw_login, secured_secantus,
                                  with_credentials)

PROXY_USER, PROXY_PASSWORD = "dvara-svc", "Pr0xy-s3cret-7f2c"
APP_USER, APP_PASSWORD = "app", "App-pa55word-91de"
READER, READER_PASSWORD = "reader", "Read-0nly-pw-55aa"
WRONG_PASSWORDS = ("Wr0ng-guess-1111", "Wr0ng-guess-2222")
SECRETS = (PROXY_PASSWORD, APP_PASSWORD, READER_PASSWORD) + WRONG_PASSWORDS
TIMEOUTS = {"serverSelectionTimeoutMS": 10000, "connectTimeoutMS": 5000}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    """A SecantusDB with --auth and the proxy's own user."""
    server = secured_secantus(tmp_path_factory.mktemp("secured"), {PROXY_USER: PROXY_PASSWORD})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --client-auth-file with a read-write and a read-only user, made with dvara adduser."""
    path = tmp_path_factory.mktemp("users") / "users.json"
    assert adduser(path, APP_USER, APP_PASSWORD).returncode == 0
    assert adduser(path, READER, READER_PASSWORD, "--read-only").returncode == 0
    assert adduser(path, "modern", APP_PASSWORD, "--mechanisms", "SCRAM-SHA-256").returncode == 0
    return path


@pytest.fixture()
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PROXY_PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture()
def gated(secured: Secantus, users: Path, password_file: Path,
          start_dvara: Callable[..., Dvara]) -> Dvara:
    """dvara logged in to the secured server, requiring client logins."""
    return start_dvara(secured.address, "--username", PROXY_USER, "--password-file",
                       str(password_file), "--client-auth-file", str(users),
                       "--log-level", "debug")


def client(proxy: Dvara, user: str = "", password: str = "", **options) -> MongoClient:
    uri = with_credentials(proxy.uri(), user, password) if user else proxy.uri()
    return MongoClient(uri, **{**TIMEOUTS, **options})


# -- the proxy's own login (server side) ----------------------------------------------

@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
def test_dvara_logs_in_to_a_secured_server_and_serves_pymongo(
        secured: Secantus, password_file: Path, start_dvara: Callable[..., Dvara],
        mechanism: str):
    proxy = start_dvara(secured.address, "--username", PROXY_USER,
                        "--password-file", str(password_file), "--auth-mechanism", mechanism)
    with client(proxy) as c:
        coll = c.authdb.things
        coll.delete_many({})
        coll.insert_many([{"_id": i, "n": i * i} for i in range(50)])
        assert coll.count_documents({"n": {"$gte": 100}}) == 40
        assert [d["_id"] for d in coll.find().sort("_id", 1).batch_size(7)] == list(range(50))
        # replSetGetStatus needs a login on the server: relayed on a logged-in connection,
        # with the member named by its proxy address
        status = c.admin.command("replSetGetStatus")
        assert [m["name"] for m in status["members"]] == [proxy.uri().split("/")[2]]
    assert "CANNOT LOG IN" not in proxy.log()


def test_a_wrong_proxy_password_is_logged_and_clients_get_a_clear_error(
        secured: Secantus, start_dvara: Callable[..., Dvara]):
    proxy = start_dvara(secured.address, "--username", PROXY_USER,
                        env={"DVARA_PASSWORD": WRONG_PASSWORDS[0]})
    with client(proxy, retryReads=False, retryWrites=False) as c:
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(OperationFailure) as info:
                c.authdb.things.find_one()
            assert info.value.code == 6, info.value.details
            assert "cannot reach the server" in str(info.value)
            assert "cannot log in" in str(info.value)
            assert secured.address not in str(info.value)      # no real address for clients
        assert time.monotonic() - started < 10                 # answered, never a hang
    log = wait_until(lambda: "CANNOT LOG IN" in proxy.log() and proxy.log(), "the failure logged")
    line = next(l for l in log.splitlines() if "CANNOT LOG IN" in l)
    assert f"to {secured.address} as admin.{PROXY_USER} with SCRAM-SHA-256" in line
    assert "authentication failed" in line.lower()
    # backed off: 20 requests cost a handful of logins, not 20 (nor a tight loop)
    failures = [int(n) for n in re.findall(r"\((\d+) failure\(s\)\)", log)]
    assert failures and max(failures) <= 6, failures
    assert sum("cannot" in line.lower() for line in log.splitlines()) <= 4   # no log flood


def test_dvara_logs_in_once_the_server_knows_its_user(
        secured: Secantus, start_dvara: Callable[..., Dvara]):
    """A refused login is retried, spaced out: once the user exists, clients get through."""
    proxy = start_dvara(secured.address, "--username", "late-svc", "--password",
                        PROXY_PASSWORD)
    with client(proxy, retryReads=False) as c:
        with pytest.raises(OperationFailure):
            c.authdb.things.find_one()
        with MongoClient(with_credentials(f"mongodb://{secured.address}/?directConnection=true",
                                          PROXY_USER, PROXY_PASSWORD)) as direct:
            direct.admin.command("createUser", "late-svc", pwd=PROXY_PASSWORD, roles=["root"])

        def works() -> bool:
            try:
                c.authdb.things.find_one()
                return True
            except OperationFailure:
                return False
        wait_until(works, "dvara to log in with its new user", timeout=40, step=0.2)
    assert "logged in to" in proxy.log() and "again after" in proxy.log()


def test_password_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cases = [(["--username", "u"], "--username: needs --password or --password-file"),
             (["--password", "p"], "needs --username"),
             (["--username", "u", "--password", "p", "--password-file", "f"], "not both"),
             (["--tls-mode", "require"], "--tls-mode: require needs --tls-cert-file"),
             (["--tls-cert-file", "c", "--tls-require-client-cert"], "needs --tls-ca-file"),
             (["--backend-tls-ca-file", "c"], "need --backend-tls"),
             (["--auth-mechanism", "PLAIN"], "must be one of SCRAM-SHA-256, SCRAM-SHA-1")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            parse_args(argv, env={})
        assert message in capsys.readouterr().err, argv
    s = parse_args(["--tls-cert-file", "c", "--auth-mechanism", "scram-sha-1"], env={})
    assert (s.tls_mode, s.auth_mechanism) == ("require", "SCRAM-SHA-1")
    assert PROXY_PASSWORD not in repr(parse_args(
        ["--username", "u", "--password", PROXY_PASSWORD], env={}))


# -- client logins (the proxy as SCRAM server) ----------------------------------------

@pytest.mark.parametrize("mechanism", [None, "SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_pymongo_logs_in_to_dvara(gated: Dvara, mechanism):
    extra = {"authMechanism": mechanism} if mechanism else {}
    with client(gated, APP_USER, APP_PASSWORD, **extra) as c:
        c.authdb.logins.insert_one({"mechanism": mechanism or "negotiated"})
        assert c.authdb.logins.count_documents({}) >= 1
    # pymongo logged in inside its handshake hello: one round trip, no separate saslStart
    wanted = f"logged in as admin.{APP_USER} ({mechanism or 'SCRAM-SHA-256'}, speculative)"
    wait_until(lambda: wanted in gated.log(), "a speculative login in the log")


def test_speculative_login_by_hand(gated: Dvara):
    """hello carries speculativeAuthenticate; its answer starts the conversation."""
    raw = RawClient(gated.port)
    scram_client = scram.ScramClient(scram.SHA256, APP_USER, APP_PASSWORD)
    hello = raw.command({"hello": 1, "saslSupportedMechs": f"admin.{APP_USER}",
                         "speculativeAuthenticate": {
                             "saslStart": 1, "mechanism": "SCRAM-SHA-256", "db": "admin",
                             "payload": Binary(scram_client.first()),
                             "options": {"skipEmptyExchange": True}}})
    assert hello["saslSupportedMechs"] == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    spec = hello["speculativeAuthenticate"]
    assert spec["conversationId"] == 1 and spec["done"] is False
    reply = raw.command({"saslContinue": 1, "conversationId": 1,
                         "payload": Binary(scram_client.final(bytes(spec["payload"])))})
    assert reply["ok"] == 1 and reply["done"] is True
    scram_client.verify(bytes(reply["payload"]))
    assert raw.command({"count": "logins"}, "authdb")["ok"] == 1
    raw.close()


def test_sasl_supported_mechs_follow_the_user(gated: Dvara):
    raw = RawClient(gated.port)
    assert raw.command({"hello": 1, "saslSupportedMechs": "admin.app"})[
        "saslSupportedMechs"] == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert raw.command({"isMaster": 1, "saslSupportedMechs": "admin.modern"})[
        "saslSupportedMechs"] == ["SCRAM-SHA-256"]
    assert "saslSupportedMechs" not in raw.command({"hello": 1})
    # an unknown user gets the usual list: hello does not tell who exists
    assert raw.command({"hello": 1, "saslSupportedMechs": "admin.ghost"})[
        "saslSupportedMechs"] == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    raw.close()


def test_wrong_password_and_unknown_user_get_code_18(gated: Dvara):
    for user, password in ((APP_USER, WRONG_PASSWORDS[0]), ("ghost", WRONG_PASSWORDS[1])):
        with client(gated, user, password) as c:
            with pytest.raises(OperationFailure) as info:
                c.authdb.logins.find_one()
            assert info.value.code == 18, info.value.details
    with client(gated, "modern", APP_PASSWORD, authMechanism="SCRAM-SHA-1") as c:
        with pytest.raises(OperationFailure) as info:          # a mechanism it does not have
            c.admin.command("ping")
        assert info.value.code == 18
    raw = RawClient(gated.port)
    reply = raw_login(raw, APP_USER, WRONG_PASSWORDS[0], scram.SHA1)
    assert (reply["ok"], reply["code"], reply["codeName"]) == (0, 18, "AuthenticationFailed")
    raw.close()
    assert "client login failed from 127.0.0.1 as 'app'" in gated.log()


def test_commands_before_login_get_unauthorized(gated: Dvara, raw_client):
    raw = raw_client(gated.port)
    for allowed in ({"hello": 1}, {"isMaster": 1}, {"ping": 1}, {"buildInfo": 1}):
        assert raw.command(allowed)["ok"] == 1, allowed
    for refused, db in (({"find": "logins"}, "authdb"), ({"insert": "logins", "documents": [{}]},
                        "authdb"), ({"listDatabases": 1}, "admin"),
                        ({"replSetGetStatus": 1}, "admin")):
        reply = raw.command(refused, db)
        assert (reply["ok"], reply["code"], reply["codeName"]) == (0, 13, "Unauthorized")
        assert reply["errmsg"] == f"command {next(iter(refused))} requires authentication"
    # a legacy OP_QUERY command and query get the same answer
    assert raw.legacy_command({"count": "logins"}, "authdb")["code"] == 13
    raw.send(wire.op_query("authdb.logins", {}, number_to_return=1))
    flags, _, _, docs = wire.decode_reply(raw.recv_frame())
    assert flags & wire.REPLY_QUERY_FAILURE and docs[0]["code"] == 13
    # a message with no reply cannot be answered: the connection is closed
    raw.send(wire.op_msg({"insert": "logins", "documents": [{}], "$db": "authdb"},
                         flags=wire.MORE_TO_COME))
    assert raw.closed_by_peer()
    with client(gated) as c:
        with pytest.raises(OperationFailure) as info:
            c.authdb.logins.find_one()
        assert info.value.code == 13


def test_a_read_only_user_reads_but_cannot_write(gated: Dvara):
    with client(gated, APP_USER, APP_PASSWORD) as writer:
        writer.authdb.ro.delete_many({})
        writer.authdb.ro.insert_many([{"_id": i} for i in range(5)])
    with client(gated, READER, READER_PASSWORD) as c:
        coll = c.authdb.ro
        assert coll.count_documents({}) == 5
        assert sorted(d["_id"] for d in coll.find()) == list(range(5))
        assert len(list(coll.aggregate([{"$match": {"_id": {"$gte": 3}}}]))) == 2
        assert coll.distinct("_id") == list(range(5))
        for write in (lambda: coll.insert_one({"_id": 99}),
                      lambda: coll.update_one({"_id": 1}, {"$set": {"x": 1}}),
                      lambda: coll.delete_many({}),
                      lambda: coll.find_one_and_delete({"_id": 1}),
                      lambda: coll.create_index("x"),
                      lambda: coll.drop(),
                      lambda: list(coll.aggregate([{"$out": "copy"}])),
                      lambda: c.authdb.command("create", "newcoll")):
            with pytest.raises(OperationFailure) as info:
                write()
            assert info.value.code == 13, info.value.details
            assert "read-only" in str(info.value)
    with client(gated, APP_USER, APP_PASSWORD) as writer:
        assert writer.authdb.ro.count_documents({}) == 5
    # a legacy write opcode has no reply: the connection is closed
    with RawClient(gated.port) as raw:
        assert raw_login(raw, READER, READER_PASSWORD)["ok"] == 1
        raw.send(_op_insert("authdb.ro", {"_id": 100}))
        assert raw.closed_by_peer()


def test_other_mechanisms_are_refused_clearly(gated: Dvara):
    raw = RawClient(gated.port)
    reply = raw.command({"authenticate": 1, "mechanism": "MONGODB-X509"}, "$external")
    assert reply["code"] == 334 and "SCRAM-SHA-256" in reply["errmsg"]
    assert raw.command({"getnonce": 1})["code"] == 59
    reply = raw.command({"saslStart": 1, "mechanism": "PLAIN", "payload": Binary(b"\0a\0b")})
    assert reply["code"] == 18
    reply = raw.command({"saslContinue": 1, "conversationId": 1, "payload": Binary(b"")})
    assert reply["code"] == 18
    raw.close()


def test_failed_logins_are_rate_limited_per_ip(secured: Secantus, users: Path,
                                                password_file: Path,
                                                start_dvara: Callable[..., Dvara]):
    proxy = start_dvara(secured.address, "--username", PROXY_USER, "--password-file",
                        str(password_file), "--client-auth-file", str(users),
                        "--auth-failure-limit", "3")
    raw = RawClient(proxy.port)
    for _ in range(3):
        assert raw_login(raw, APP_USER, WRONG_PASSWORDS[0])["code"] == 18
    reply = raw_login(raw, APP_USER, APP_PASSWORD)         # even the right one, for a while
    assert reply["code"] == 18 and "too many failed logins" in reply["errmsg"]
    raw.close()
    other = RawClient.__new__(RawClient)                   # another address is not affected
    other.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10,
                                          source_address=("127.0.0.2", 0))
    assert raw_login(other, APP_USER, APP_PASSWORD)["ok"] == 1
    other.close()
    assert "now refused for a while" in proxy.log()


def test_trusting_dvara_refuses_client_logins_clearly(
        secured: Secantus, password_file: Path, start_dvara: Callable[..., Dvara]):
    """Without --client-auth-file clients are trusted; a client login is refused, never
    relayed to the proxy's logged-in server connections."""
    proxy = start_dvara(secured.address, "--username", PROXY_USER,
                        "--password-file", str(password_file))
    with client(proxy, APP_USER, APP_PASSWORD) as c:
        with pytest.raises(OperationFailure) as info:
            c.admin.command("ping")
        assert info.value.code == 18 and "connect without credentials" in str(info.value)
    with client(proxy) as c:
        assert c.admin.command("ping")["ok"] == 1


# -- dvara adduser and the user file ----------------------------------------------------

def test_adduser_writes_salted_keys_only(tmp_path: Path):
    path = tmp_path / "users.json"
    done = adduser(path, "alice", "Al1ce-pw-000")
    assert done.returncode == 0, done.stderr
    assert "added read-write user admin.alice" in done.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "Al1ce-pw-000" not in path.read_text()
    again = adduser(path, "alice", "Al1ce-pw-001", "--read-only", "--db", "reports")
    assert again.returncode == 0 and "added read-only user reports.alice" in again.stdout
    replaced = adduser(path, "alice", "Al1ce-pw-002")
    assert "replaced read-write user admin.alice" in replaced.stdout
    entries = json.loads(path.read_text())["users"]
    assert [(e["user"], e["db"], e["read_only"]) for e in entries] == [
        ("alice", "admin", False), ("alice", "reports", True)]
    assert set(entries[0]) == {"user", "db", "read_only", "SCRAM-SHA-256", "SCRAM-SHA-1"}
    assert adduser(path, "bob", "").returncode == 2                     # no empty password
    assert adduser(path, "bob", "x", "--mechanisms", "PLAIN").returncode == 2


def test_users_added_while_dvara_runs_can_log_in(
        secured: Secantus, password_file: Path, tmp_path: Path,
        start_dvara: Callable[..., Dvara]):
    path = tmp_path / "live-users.json"
    assert adduser(path, APP_USER, APP_PASSWORD).returncode == 0
    proxy = start_dvara(secured.address, "--username", PROXY_USER, "--password-file",
                        str(password_file), "--client-auth-file", str(path))
    with client(proxy, "late", APP_PASSWORD) as c:
        with pytest.raises(OperationFailure):
            c.admin.command("ping")
    assert adduser(path, "late", APP_PASSWORD).returncode == 0
    with client(proxy, "late", APP_PASSWORD) as c:
        assert c.authdb.logins.count_documents({}) >= 0


# -- secrets ------------------------------------------------------------------------------

def test_no_secret_in_log_status_or_metrics(secured: Secantus, users: Path,
                                           start_dvara: Callable[..., Dvara]):
    admin = f"127.0.0.1:{free_port()}"
    proxy = start_dvara(secured.address, "--username", PROXY_USER, "--password",
                        PROXY_PASSWORD, "--client-auth-file", str(users),
                        "--admin-addr", admin, "--log-level", "debug")
    with client(proxy, APP_USER, APP_PASSWORD) as c:
        c.authdb.logins.insert_one({"secret_scan": True})
    with client(proxy, READER, READER_PASSWORD) as c:
        with pytest.raises(OperationFailure):
            c.authdb.logins.insert_one({})
    for wrong in WRONG_PASSWORDS:
        with client(proxy, APP_USER, wrong) as c:
            with pytest.raises(OperationFailure):
                c.admin.command("ping")
    status = json.loads(http_get(admin, "/status"))
    assert status["config"]["password"] == "***"
    assert status["config"]["client_auth_file"] == str(users)
    texts = {"log": proxy.log(), "status": json.dumps(status),
             "metrics": http_get(admin, "/metrics")}
    for where, text in texts.items():
        for secret in _secrets(users):
            assert secret not in text, f"a secret ({secret[:4]}...) is in the {where}"


def _secrets(users: Path) -> list[str]:
    """The passwords, and every stored/server key of the user file, as base64 and hex."""
    found = list(SECRETS)
    for entry in json.loads(users.read_text())["users"]:
        for mechanism in (m for m in scram.MECHANISMS if m in entry):
            for key in ("storedKey", "serverKey"):
                encoded = entry[mechanism][key]
                found += [encoded, scram.unb64(encoded).hex()]
    return found


def _op_insert(ns: str, doc: dict) -> bytes:
    import struct

    import bson
    body = struct.pack("<i", 0) + ns.encode() + b"\0" + bson.encode(doc)
    return wire.HEADER.pack(16 + len(body), wire.next_request_id(), 0, wire.OP_INSERT) + body
