"""SCRAM pass-through: verifiers that match the server's (dvara adduser
--from-server), and --auth-passthrough (each client on server connections logged in as
its own user), against a SecantusDB started with --auth, which enforces roles."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from dvara_lib.errors import ConnectionFailure
from dvara_lib.security import scram
from tests.helpers import Dvara, RawClient, Secantus, free_port, wait_until
from tests.secure_helpers import (adduser, http_get, raw_login, secured_secantus,
                                  with_credentials)

ROOT_USER, ROOT_PASSWORD = "root-svc", "R00t-s3cret-4e1a"
READER, READER_PASSWORD = "reader", "Read-pa55-77c1"
WRITER, WRITER_PASSWORD = "writer", "Wr1te-pa55-0b9d"
TIMEOUTS = {"serverSelectionTimeoutMS": 10000, "connectTimeoutMS": 5000}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secantus]:
    """A SecantusDB with --auth: a root account, a read user and a readWrite user."""
    server = secured_secantus(
        tmp_path_factory.mktemp("passthrough"),
        {ROOT_USER: ROOT_PASSWORD, READER: READER_PASSWORD, WRITER: WRITER_PASSWORD},
        roles={READER: ["readAnyDatabase"], WRITER: ["readWriteAnyDatabase"]})
    yield server
    server.stop()


def direct(server: Secantus, user: str = ROOT_USER, password: str = ROOT_PASSWORD
           ) -> MongoClient:
    return MongoClient(f"mongodb://{user}:{password}@{server.address}/?directConnection=true",
                       **TIMEOUTS)


def _server_credentials(server: Secantus, user: str) -> dict:
    with direct(server) as c:
        info = c.admin.command("usersInfo", {"user": user, "db": "admin"},
                               showCredentials=True)
    return info["users"][0]["credentials"]


# -- verifiers matching the server's: dvara adduser --from-server --------------------------

def test_adduser_from_server_stores_the_servers_verifier(secured: Secantus, tmp_path: Path):
    path = tmp_path / "users.json"
    done = adduser(path, WRITER, WRITER_PASSWORD, "--from-server", secured.address)
    assert done.returncode == 0, done.stderr
    assert f"matching {secured.address}" in done.stdout
    entry = json.loads(path.read_text())["users"][0]
    server = _server_credentials(secured, WRITER)
    for mechanism in scram.MECHANISMS:
        mine, theirs = entry[mechanism], server[mechanism]
        assert (mine["salt"], mine["iterations"]) == (theirs["salt"], theirs["iterationCount"])
        assert (mine["storedKey"], mine["serverKey"]) == (theirs["storedKey"],
                                                          theirs["serverKey"])
    assert WRITER_PASSWORD not in path.read_text()


def test_adduser_from_server_refuses_a_wrong_password_and_writes_nothing(
        secured: Secantus, tmp_path: Path):
    path = tmp_path / "users.json"
    done = adduser(path, READER, "Wr0ng-guess-9999", "--from-server", secured.address)
    assert done.returncode == 2 and "refused every login as admin.reader" in done.stderr
    assert not path.exists()
    unknown = adduser(path, "nobody", READER_PASSWORD, "--from-server", secured.address)
    assert unknown.returncode == 2 and not path.exists()
    iterations = adduser(path, READER, READER_PASSWORD, "--from-server", secured.address,
                         "--iterations", "20000")
    assert iterations.returncode == 2 and "--iterations" in iterations.stderr
    dead = adduser(path, READER, READER_PASSWORD, "--from-server", "127.0.0.1:1")
    assert dead.returncode == 2 and "cannot connect" in dead.stderr and not path.exists()


def test_adduser_from_server_leaves_out_a_mechanism_the_user_lacks(
        secured: Secantus, tmp_path: Path):
    with direct(secured) as c:
        c.admin.command("createUser", "only256", pwd=READER_PASSWORD, roles=["read"],
                        mechanisms=[scram.SHA256])
    path = tmp_path / "users.json"
    done = adduser(path, "only256", READER_PASSWORD, "--from-server", secured.address)
    assert done.returncode == 0, done.stderr
    assert "left out SCRAM-SHA-1" in done.stderr
    entry = json.loads(path.read_text())["users"][0]
    assert scram.SHA256 in entry and scram.SHA1 not in entry
    explicit = adduser(path, "only256", READER_PASSWORD, "--from-server", secured.address,
                       "--mechanisms", scram.SHA1)
    assert explicit.returncode == 2


def test_users_added_from_the_server_log_in_to_dvara(
        secured: Secantus, tmp_path: Path, start_dvara: Callable[..., Dvara]):
    path = tmp_path / "users.json"
    for name, password, flags in ((READER, READER_PASSWORD, ("--read-only",)),
                                  (WRITER, WRITER_PASSWORD, ())):
        assert adduser(path, name, password, "--from-server", secured.address,
                       *flags).returncode == 0
    proxy = start_dvara(secured.address, "--username", ROOT_USER, "--password",
                        ROOT_PASSWORD, "--client-auth-file", str(path))
    for mechanism in scram.MECHANISMS:
        uri = with_credentials(proxy.uri(), WRITER, WRITER_PASSWORD, authMechanism=mechanism)
        with MongoClient(uri, **TIMEOUTS) as c:
            c.passthrough.items.insert_one({"by": WRITER, "mechanism": mechanism})
    uri = with_credentials(proxy.uri(), READER, "Wr0ng-guess-9999")
    with MongoClient(uri, **TIMEOUTS) as c:
        with pytest.raises(OperationFailure) as info:
            c.admin.command("ping")
        assert info.value.code == 18


# -- --auth-passthrough ---------------------------------------------------------------------

UNAUTHORIZED = 13


@pytest.fixture(scope="module")
def from_server(secured: Secantus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user file with reader and writer, verifiers copied from the server."""
    path = tmp_path_factory.mktemp("passthrough-users") / "users.json"
    for name, password in ((READER, READER_PASSWORD), (WRITER, WRITER_PASSWORD)):
        done = adduser(path, name, password, "--from-server", secured.address)
        assert done.returncode == 0, done.stderr
    return path


def passthrough(start_dvara: Callable[..., Dvara], secured: Secantus, users: Path,
                *flags: str) -> tuple[Dvara, str]:
    """dvara with --auth-passthrough (its own account for monitoring), and its admin
    address."""
    admin = f"127.0.0.1:{free_port()}"
    proxy = start_dvara(secured.address, "--username", ROOT_USER, "--password",
                        ROOT_PASSWORD, "--client-auth-file", str(users), "--auth-passthrough",
                        "--admin-addr", admin, *flags)
    return proxy, admin


def as_user(proxy: Dvara, user: str, password: str, **options: Any) -> MongoClient:
    return MongoClient(with_credentials(proxy.uri(), user, password, **options),
                       **TIMEOUTS)


def _authenticated(c: MongoClient) -> list[dict]:
    return c.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"]


def test_each_client_acts_on_the_server_as_its_own_user_under_load(
        secured: Secantus, from_server: Path, start_dvara: Callable[..., Dvara]):
    proxy, admin = passthrough(start_dvara, secured, from_server, "--max-connections", "4")
    failures: list[str] = []

    def work(user: str, password: str, mechanism: str) -> None:
        try:
            with as_user(proxy, user, password, authMechanism=mechanism) as c:
                for i in range(15):
                    assert _authenticated(c) == [{"user": user, "db": "admin"}]
                    if user == WRITER:
                        c.load.items.insert_one({"i": i, "by": mechanism})
                    else:
                        with pytest.raises(OperationFailure) as info:
                            c.load.items.insert_one({"i": i})
                        assert info.value.code == UNAUTHORIZED
                        c.load.items.find_one()
        except BaseException as exc:              # reported below, with the user
            failures.append(f"{user}/{mechanism}: {exc!r}")

    threads = [threading.Thread(target=work, args=(user, password, mechanism))
               for user, password in ((READER, READER_PASSWORD), (WRITER, WRITER_PASSWORD))
               for mechanism in scram.MECHANISMS for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    with direct(secured) as c:
        assert c.load.items.count_documents({}) == 4 * 15
    pool = json.loads(http_get(admin, "/status"))["members"][0]["pool"]
    assert pool["open"] <= 4 and set(pool["users"]) <= {"admin.reader", "admin.writer"}
    assert sum(u["open"] for u in pool["users"].values()) == pool["open"]


def test_a_users_requests_and_cursor_stay_on_its_own_server_connections(
        secured: Secantus, from_server: Path, start_dvara: Callable[..., Dvara]):
    """mongod refuses a getMore from another user than the cursor's; SecantusDB does not
    tie cursors to users, so this checks dvara's half: the server connections each user's
    requests (its getMores too) go over are its own (whatsmyuri: the connection's port)."""
    proxy, _ = passthrough(start_dvara, secured, from_server, "--max-connections", "2")
    with direct(secured) as c:
        c.cursors.items.insert_many([{"i": i} for i in range(10)])
    ports: dict[str, set[str]] = {READER: set(), WRITER: set()}
    with as_user(proxy, WRITER, WRITER_PASSWORD) as writer, \
            as_user(proxy, READER, READER_PASSWORD) as reader:
        cursor = writer.cursors.command("find", "items", batchSize=2)["cursor"]
        seen = [d["i"] for d in cursor["firstBatch"]]
        for _ in range(4):                       # the reader's traffic in between
            ports[READER].add(reader.admin.command("whatsmyuri")["you"])
            assert _authenticated(reader) == [{"user": READER, "db": "admin"}]
            more = writer.cursors.command("getMore", cursor["id"], collection="items",
                                          batchSize=2)["cursor"]
            seen += [d["i"] for d in more["nextBatch"]]
            ports[WRITER].add(writer.admin.command("whatsmyuri")["you"])
    assert seen == list(range(10))
    assert ports[READER] and ports[WRITER] and not ports[READER] & ports[WRITER]


def test_a_password_changed_on_the_server_is_refused_at_the_next_login(
        secured: Secantus, tmp_path: Path, start_dvara: Callable[..., Dvara]):
    with direct(secured) as c:
        c.admin.command("createUser", "changer", pwd="Old-pa55-3c3c",
                        roles=["readWriteAnyDatabase"], mechanisms=list(scram.MECHANISMS))
    path = tmp_path / "users.json"
    for name, password in (("changer", "Old-pa55-3c3c"), (READER, READER_PASSWORD)):
        assert adduser(path, name, password, "--from-server", secured.address).returncode == 0
    proxy, admin = passthrough(start_dvara, secured, path, "--max-connections", "1")
    with as_user(proxy, "changer", "Old-pa55-3c3c") as changer:
        changer.moved.items.insert_one({"before": True})
        with direct(secured) as c:
            c.admin.command("updateUser", "changer", pwd="New-pa55-4d4d")
        with as_user(proxy, READER, READER_PASSWORD) as reader:
            reader.moved.items.find_one()            # takes changer's only connection
        with pytest.raises(OperationFailure) as info:
            changer.moved.items.find_one()           # a new server login: refused
        assert info.value.code == 18 and "refused the login as admin.changer" in str(info.value)
        with pytest.raises(OperationFailure) as info:
            changer.moved.items.find_one()           # logged out of dvara
        assert info.value.code == UNAUTHORIZED
    users = json.loads(http_get(admin, "/status"))["members"][0]["pool"]["users"]
    assert "admin.changer" not in users
    assert "refused the login as admin.changer" in proxy.log()
    assert adduser(path, "changer", "New-pa55-4d4d", "--from-server",
                   secured.address).returncode == 0
    with as_user(proxy, "changer", "New-pa55-4d4d") as changer:
        changer.moved.items.insert_one({"after": True})
        assert _authenticated(changer) == [{"user": "changer", "db": "admin"}]


def test_no_client_key_in_log_status_or_metrics(
        secured: Secantus, from_server: Path, start_dvara: Callable[..., Dvara]):
    proxy, admin = passthrough(start_dvara, secured, from_server, "--log-level", "debug")
    for mechanism in scram.MECHANISMS:
        with as_user(proxy, WRITER, WRITER_PASSWORD, authMechanism=mechanism) as c:
            c.secrets.items.insert_one({"scan": True})
        with as_user(proxy, READER, READER_PASSWORD, authMechanism=mechanism) as c:
            with pytest.raises(OperationFailure):
                c.secrets.items.insert_one({})
    texts = {"log": proxy.log(), "status": http_get(admin, "/status"),
             "metrics": http_get(admin, "/metrics")}
    secrets = _client_keys(from_server) + [READER_PASSWORD, WRITER_PASSWORD, ROOT_PASSWORD]
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:4]}...) is in the {where}"


def _client_keys(users: Path) -> list[str]:
    """Every user's ClientKey (what dvara keeps in memory), as base64 and hex."""
    passwords = {READER: READER_PASSWORD, WRITER: WRITER_PASSWORD}
    found = []
    for entry in json.loads(users.read_text())["users"]:
        for mechanism in scram.MECHANISMS:
            digest = "sha1" if mechanism == scram.SHA1 else "sha256"
            password = scram.prepared_password(mechanism, entry["user"],
                                               passwords[entry["user"]])
            salted = hashlib.pbkdf2_hmac(digest, password.encode(),
                                         scram.unb64(entry[mechanism]["salt"]),
                                         entry[mechanism]["iterations"])
            key = hmac.new(salted, b"Client Key", digest).digest()
            assert hashlib.new(digest, key).digest() == scram.unb64(
                entry[mechanism]["storedKey"])
            found += [scram.b64(key), key.hex()]
    return found


def test_a_restart_closes_logged_in_clients_who_log_in_again_as_themselves(
        secured: Secantus, from_server: Path, tmp_path: Path):
    """A ClientKey never leaves its process: on a graceful restart a logged-in client is
    closed between two messages (drivers reconnect and log in again); a client that has
    not logged in moves to the new process as before. Nothing acknowledged is lost."""
    from tests.integration.test_restart import _alive, _pid, _stop_current
    pidfile = tmp_path / "dvara.pid"
    proxy = Dvara(tmp_path, secured.address, "--username", ROOT_USER, "--password",
                  ROOT_PASSWORD, "--client-auth-file", str(from_server), "--auth-passthrough",
                  "--pidfile", str(pidfile))
    anonymous, logged_in = RawClient(proxy.port, 30), RawClient(proxy.port, 30)
    acked: list[int] = []
    try:
        assert raw_login(logged_in, WRITER, WRITER_PASSWORD)["ok"] == 1.0
        assert logged_in.command({"ping": 1})["ok"] == 1.0
        with as_user(proxy, WRITER, WRITER_PASSWORD) as writer, \
                as_user(proxy, READER, READER_PASSWORD) as reader:
            for i in range(5):
                writer.restarted.items.insert_one({"_id": i})
                acked.append(i)
            old = proxy.pid
            proxy.send_signal(signal.SIGUSR2)
            wait_until(lambda: _pid(pidfile) not in (0, old), "the new process", 60)
            wait_until(lambda: not _alive(old), "the old process to exit", 40)
            assert anonymous.command({"ping": 1})["ok"] == 1.0      # moved, as before
            with pytest.raises((ConnectionFailure, OSError)):
                logged_in.command({"ping": 1})                     # closed, not moved
            for i in range(5, 10):                                 # drivers log in again
                writer.restarted.items.insert_one({"_id": i})
                acked.append(i)
            assert _authenticated(writer) == [{"user": WRITER, "db": "admin"}]
            assert _authenticated(reader) == [{"user": READER, "db": "admin"}]
            with pytest.raises(OperationFailure) as info:
                reader.restarted.items.insert_one({"_id": 99})
            assert info.value.code == UNAUTHORIZED
        with direct(secured) as c:
            assert sorted(d["_id"] for d in c.restarted.items.find()) == acked
    finally:
        anonymous.close()
        logged_in.close()
        _stop_current(pidfile, proxy)
