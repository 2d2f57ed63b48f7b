"""--auth-query (dvara_lib.security.authquery): usersInfo credentials into Credentials,
and the verifier cache (time-out, change detection) on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from bson.binary import Binary

from dvara_lib.errors import AuthQueryFailure, ConnectionFailure
from dvara_lib.security import scram
from dvara_lib.security.authquery import (VerifierCache, credentials_from_users_info,
                                          users_info_command)


def _info(name: str, password: str, db: str = "admin", binary: bool = False) -> dict[str, Any]:
    """A usersInfo reply as mongod (base64 text) or binary keys would give it."""
    creds = {}
    for mechanism in scram.MECHANISMS:
        c = scram.make_credential(mechanism, name, password)
        pack = (lambda b: Binary(b)) if binary else scram.b64
        creds[mechanism] = {"iterationCount": c.iterations, "salt": pack(c.salt),
                            "storedKey": pack(c.stored_key), "serverKey": pack(c.server_key)}
    return {"users": [{"_id": f"{db}.{name}", "user": name, "db": db, "roles": [],
                       "credentials": creds}], "ok": 1.0}


@pytest.mark.parametrize("binary", [False, True])
def test_credentials_are_parsed_and_verify_the_password(binary: bool):
    creds = credentials_from_users_info(_info("app", "s3cret", binary=binary), "admin", "app")
    assert creds is not None and set(creds) == set(scram.MECHANISMS)
    for mechanism, c in creds.items():
        again = scram.make_credential(mechanism, "app", "s3cret", c.iterations, c.salt)
        assert again == c


def test_parsing_unknown_users_errors_and_bad_credentials():
    assert credentials_from_users_info({"users": [], "ok": 1.0}, "admin", "app") is None
    assert credentials_from_users_info(_info("app", "x", db="other"), "admin", "app") is None
    assert credentials_from_users_info(_info("other", "x"), "admin", "app") is None
    no_creds = {"users": [{"user": "app", "db": "admin"}], "ok": 1.0}
    assert credentials_from_users_info(no_creds, "admin", "app") is None
    with pytest.raises(AuthQueryFailure, match="code 13"):
        credentials_from_users_info({"ok": 0.0, "errmsg": "not authorized", "code": 13},
                                    "admin", "app")
    info = _info("app", "x")
    info["users"][0]["credentials"][scram.SHA1]["salt"] = "not base64!"
    with pytest.raises(AuthQueryFailure, match="malformed SCRAM-SHA-1"):
        credentials_from_users_info(info, "admin", "app")
    info = _info("app", "x")
    info["users"][0]["credentials"][scram.SHA256]["iterationCount"] = 100
    with pytest.raises(AuthQueryFailure, match="below"):
        credentials_from_users_info(info, "admin", "app")
    assert users_info_command("db1", "u") == {"usersInfo": {"user": "u", "db": "db1"},
                                             "showCredentials": True}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Server:
    """A fake usersInfo: the current reply per password, counting fetches."""

    def __init__(self, password: str) -> None:
        self.reply: dict[str, Any] = _info("app", password)
        self.fetches = 0

    def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        return self.reply


def test_the_cache_serves_until_its_time_out_then_fetches_again():
    clock, server, changed = Clock(), Server("one"), []
    cache = VerifierCache(60.0, changed.append, clock)
    first = cache.get("admin", "app", server.fetch)
    assert first is not None and first.key == ("admin", "app") and not first.read_only
    clock.now += 59.9
    assert cache.get("admin", "app", server.fetch) is first and server.fetches == 1
    clock.now += 0.2
    again = cache.get("admin", "app", server.fetch)
    assert server.fetches == 2 and again == first and changed == []
    assert cache.is_current(("admin", "app"), again.credentials[scram.SHA1])


def test_a_changed_verifier_is_reported_and_old_logins_are_not_current():
    clock, server, changed = Clock(), Server("one"), []
    cache = VerifierCache(1.0, changed.append, clock)
    old = cache.get("admin", "app", server.fetch)
    assert old is not None
    server.reply = _info("app", "two")
    assert cache.get("admin", "app", server.fetch) is old    # cached: not seen yet
    assert cache.is_current(old.key, old.credentials[scram.SHA256])
    clock.now += 1.0
    new = cache.get("admin", "app", server.fetch)
    assert new is not None and new.credentials != old.credentials
    assert changed == [("admin", "app")]
    assert not cache.is_current(old.key, old.credentials[scram.SHA256])
    assert cache.is_current(new.key, new.credentials[scram.SHA256])
    server.reply = {"users": [], "ok": 1.0}                    # dropped
    clock.now += 1.0
    assert cache.get("admin", "app", server.fetch) is None
    assert changed == [("admin", "app")] * 2
    assert not cache.is_current(new.key, new.credentials[scram.SHA256])
    assert cache.is_current(("admin", "never-fetched"), new.credentials[scram.SHA256])


def test_unknown_users_are_cached_and_failures_are_not():
    clock, server = Clock(), Server("one")
    server.reply = {"users": [], "ok": 1.0}
    cache = VerifierCache(10.0, clock=clock)
    assert cache.get("admin", "nobody", server.fetch) is None
    assert cache.get("admin", "nobody", server.fetch) is None and server.fetches == 1

    def dead() -> dict[str, Any]:
        raise ConnectionFailure("cannot connect to 127.0.0.1:1")

    with pytest.raises(AuthQueryFailure, match="cannot connect"):
        cache.get("admin", "app", dead)
    with pytest.raises(AuthQueryFailure):
        cache.get("admin", "app", dead)                         # nothing was cached


def test_the_cache_is_bounded():
    clock, server = Clock(), Server("one")
    cache = VerifierCache(10.0, clock=clock, max_entries=3)
    for i in range(10):
        cache.get("admin", f"u{i}", server.fetch)
    assert len(cache._entries) <= 3 and ("admin", "u9") in cache._entries


def test_auth_query_options_are_checked(capsys: pytest.CaptureFixture[str]):
    from dvara_lib.config import parse_args
    default = parse_args([], env={})
    assert (default.auth_query, default.auth_query_cache) == (False, 60.0)
    account = ["--username", "svc", "--password", "pw"]
    for argv, message in (
            (["--auth-query", "--auth-passthrough"], "--auth-query: needs --username"),
            (["--auth-query", *account], "--auth-query: needs --auth-passthrough"),
            (["--auth-passthrough", *account], "needs --client-auth-file or --auth-query"),
            (["--auth-query-cache", "0s"], "must be > 0")):
        with pytest.raises(SystemExit):
            parse_args(argv, env={})
        assert message in capsys.readouterr().err, argv
    on = parse_args(["--auth-query", "--auth-passthrough", "--auth-query-cache", "1m30s",
                     *account], env={})
    assert (on.auth_query, on.auth_passthrough, on.auth_query_cache) == (True, True, 90.0)
