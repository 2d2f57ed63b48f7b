"""SCRAM pass-through (issue 15): verifiers that match the server's (dvara adduser
--from-server), against a SecantusDB started with --auth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from dvara_lib.security import scram
from tests.helpers import Dvara, Secantus
from tests.secure_helpers import adduser, secured_secantus, with_credentials

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
