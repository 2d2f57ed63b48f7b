"""--auth-query: dvara with no user file looks clients' users up on the
servers (usersInfo with showCredentials, as its own account), caches them for
--auth-query-cache, and relays each client as its own user (--auth-passthrough), against
a SecantusDB started with --auth, which enforces roles."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from pymongo.errors import OperationFailure

from dvara_lib.security import scram
from tests.helpers import Dvara, Secantus, free_port, wait_until
from tests.integration.test_auth_passthrough import (  # noqa: F401 (secured: a fixture)
    READER, READER_PASSWORD, ROOT_PASSWORD, ROOT_USER, WRITER, WRITER_PASSWORD, as_user,
    direct, secured)
from tests.secure_helpers import http_get

UNAUTHORIZED, AUTHENTICATION_FAILED = 13, 18


def auth_query(start_dvara: Callable[..., Dvara], secured: Secantus, *flags: str
               ) -> tuple[Dvara, str]:
    """dvara with --auth-query --auth-passthrough and no user file; its admin address."""
    admin = f"127.0.0.1:{free_port()}"
    proxy = start_dvara(secured.address, "--username", ROOT_USER, "--password", ROOT_PASSWORD,
                        "--auth-query", "--auth-passthrough", "--admin-addr", admin, *flags)
    return proxy, admin


def login_code(proxy: Dvara, user: str, password: str, **options: Any) -> int:
    """0 if user/password logs in through proxy, else the error code."""
    with as_user(proxy, user, password, **options) as c:
        try:
            c.admin.command("ping")
        except OperationFailure as exc:
            return int(exc.code or -1)
    return 0


def test_users_looked_up_on_the_server_act_as_themselves(
        secured: Secantus, start_dvara: Callable[..., Dvara]):
    proxy, admin = auth_query(start_dvara, secured)
    for mechanism in scram.MECHANISMS:
        with as_user(proxy, WRITER, WRITER_PASSWORD, authMechanism=mechanism) as writer, \
                as_user(proxy, READER, READER_PASSWORD, authMechanism=mechanism) as reader:
            for c, user in ((writer, WRITER), (reader, READER)):
                status = c.admin.command("connectionStatus")["authInfo"]
                assert status["authenticatedUsers"] == [{"user": user, "db": "admin"}]
            writer.query.items.insert_one({"by": mechanism})
            with pytest.raises(OperationFailure) as info:
                reader.query.items.insert_one({"by": mechanism})
            assert info.value.code == UNAUTHORIZED
            assert reader.query.items.find_one({"by": mechanism}) is not None
    texts = proxy.log() + http_get(admin, "/status") + http_get(admin, "/metrics")
    for secret in (READER_PASSWORD, WRITER_PASSWORD, ROOT_PASSWORD):
        assert secret not in texts


def test_an_unknown_user_fails_like_a_wrong_password(
        secured: Secantus, start_dvara: Callable[..., Dvara]):
    proxy, _ = auth_query(start_dvara, secured)
    for mechanism in scram.MECHANISMS:
        assert login_code(proxy, READER, "Wr0ng-guess-1234",
                          authMechanism=mechanism) == AUTHENTICATION_FAILED
        assert login_code(proxy, "nobody", READER_PASSWORD,
                          authMechanism=mechanism) == AUTHENTICATION_FAILED
    assert login_code(proxy, READER, READER_PASSWORD) == 0


def test_a_changed_password_is_seen_after_the_cache_time_out(
        secured: Secantus, start_dvara: Callable[..., Dvara]):
    with direct(secured) as c:
        c.admin.command("createUser", "changer", pwd="Old-pa55-7a7a",
                        roles=["readWriteAnyDatabase"], mechanisms=list(scram.MECHANISMS))
    proxy, admin = auth_query(start_dvara, secured, "--auth-query-cache", "1s")
    with as_user(proxy, "changer", "Old-pa55-7a7a") as old:
        old.changed.items.insert_one({"before": True})
        with direct(secured) as c:
            c.admin.command("updateUser", "changer", pwd="New-pa55-8b8b")
        wait_until(lambda: login_code(proxy, "changer", "New-pa55-8b8b") == 0,
                   "the new password to log in", 20, step=0.2)
        assert login_code(proxy, "changer", "Old-pa55-7a7a") == AUTHENTICATION_FAILED
        assert "verifier of admin.changer changed" in proxy.log()
        with pytest.raises(OperationFailure) as info:     # logged in with the old verifier
            old.changed.items.insert_one({"after": True})
        assert info.value.code == AUTHENTICATION_FAILED and "log in again" in str(info.value)
    with as_user(proxy, "changer", "New-pa55-8b8b") as new:
        new.changed.items.insert_one({"after": True})


def test_a_failed_user_lookup_gives_a_clear_login_error(
        secured: Secantus, start_dvara: Callable[..., Dvara]):
    proxy, _ = auth_query(start_dvara, secured, "--username", "lookup", "--password",
                          "Wr0ng-s3cret")
    code = login_code(proxy, READER, READER_PASSWORD)
    assert code == AUTHENTICATION_FAILED
    with as_user(proxy, READER, READER_PASSWORD) as c:
        with pytest.raises(OperationFailure) as info:
            c.admin.command("ping")
    assert "cannot look the user up on the servers" in str(info.value)
    assert "the user lookup on" in proxy.log()
