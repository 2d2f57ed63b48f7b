"""The per-user pool of --auth-passthrough (dvara_lib.backend.userpool), over socketpairs."""

from __future__ import annotations

import socket
import threading
from typing import Any, Iterator

import pytest

from dvara_lib.backend.userpool import UserPool
from dvara_lib.errors import AuthenticationFailure, ConnectionFailure, PoolTimeout

A, B, C = ("admin", "a"), ("admin", "b"), ("admin", "c")


class Connector:
    """One end of a fresh socketpair per call; records the login of each call."""

    def __init__(self) -> None:
        self.logins: list[Any] = []
        self.ends: list[socket.socket] = []
        self.fail: BaseException | None = None

    def __call__(self, login: Any) -> socket.socket:
        self.logins.append(login)
        if self.fail is not None:
            raise self.fail
        a, b = socket.socketpair()
        self.ends += [a, b]
        return a

    def live(self) -> int:
        return sum(1 for s in self.ends[::2] if s.fileno() != -1)


@pytest.fixture()
def connector() -> Iterator[Connector]:
    c = Connector()
    yield c
    for s in c.ends:
        s.close()


def test_each_user_gets_its_own_connections_lifo(connector: Connector):
    pool = UserPool("m", connector, 4)
    a1, a2 = pool.checkout_as(A, "login-a", 1), pool.checkout_as(A, "login-a", 1)
    b1 = pool.checkout_as(B, "login-b", 1)
    assert (a1.user, a2.user, b1.user) == (A, A, B)
    assert connector.logins == ["login-a", "login-a", "login-b"]
    for conn in (a1, a2, b1):
        pool.checkin(conn)
    assert pool.checkout_as(A, "login-a", 1) is a2            # the latest first
    assert pool.checkout_as(B, "login-b", 1) is b1            # never one of A's
    assert len(connector.logins) == 3
    assert pool.users() == {"admin.a": {"open": 2, "in_use": 1},
                            "admin.b": {"open": 1, "in_use": 1}}
    assert (pool.open_count, pool.in_use) == (3, 2)


def test_the_fast_paths_checkout_never_takes_a_users_connection(connector: Connector):
    """checkout_idle (the relay's fast path, for clients of no user) finds nothing here:
    every connection is some user's."""
    pool = UserPool("m", connector, 4)
    pool.checkin(pool.checkout_as(A, "login-a", 1))
    assert pool.checkout_idle() is None
    assert pool.checkout_as(A, "login-a", 1).user == A


def test_a_full_pool_closes_another_users_idle_connection(connector: Connector):
    pool = UserPool("m", connector, 2)
    a1, b1 = pool.checkout_as(A, "a", 1), pool.checkout_as(B, "b", 1)
    pool.checkin(a1)
    pool.checkin(b1)
    c1 = pool.checkout_as(C, "c", 1)                          # a1 was idle the longest
    assert a1.closed and not b1.closed and pool.open_count == 2
    assert set(pool.users()) == {"admin.b", "admin.c"}
    assert pool.checkout_as(B, "b", 1) is b1
    with pytest.raises(PoolTimeout):                          # all in use: wait, time out
        pool.checkout_as(A, "a", 0.05)
    pool.checkin(c1)
    assert connector.live() == 2


def test_a_waiter_gets_the_slot_another_user_frees(connector: Connector):
    pool = UserPool("m", connector, 1)
    a1 = pool.checkout_as(A, "a", 1)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout_as(B, "b", 5)))
    waiter.start()
    pool.checkin(a1)
    waiter.join(5)
    assert got and got[0].user == B and a1.closed and pool.open_count == 1


def test_max_per_user_caps_one_users_share(connector: Connector):
    pool = UserPool("m", connector, 4, max_per_user=2)
    pool.checkout_as(A, "a", 1)
    pool.checkout_as(A, "a", 1)
    with pytest.raises(PoolTimeout):
        pool.checkout_as(A, "a", 0.05)
    assert pool.checkout_as(B, "b", 1).user == B


def test_a_refused_login_frees_its_slot_and_clear_user_retires_that_user(
        connector: Connector):
    pool = UserPool("m", connector, 2)
    a1, a2 = pool.checkout_as(A, "a", 1), pool.checkout_as(A, "a", 1)
    pool.checkin(a1)
    pool.checkin(a2)
    b1 = pool.checkout_as(B, "b", 1)
    pool.checkin(b1)
    connector.fail = AuthenticationFailure("refused")
    with pytest.raises(AuthenticationFailure):
        pool.checkout_as(C, "c", 1)
    assert pool.open_count == 1 and "admin.c" not in pool.users()
    connector.fail = None
    lent = pool.checkout_as(A, "a", 1)
    pool.clear_user(A)
    assert a1.closed or a2.closed
    pool.checkin(lent)                                        # retired: closed on return
    assert lent.closed and set(pool.users()) == {"admin.b"} and pool.open_count == 1


def test_not_logged_in_clear_maintain_and_close(connector: Connector):
    pool = UserPool("m", connector, 3, idle_timeout=0.0)
    anonymous = pool.checkout(1)
    assert anonymous.user is None and connector.logins == [None]
    pool.checkin(anonymous)
    a1 = pool.checkout_as(A, "a", 1)
    pool.clear()
    pool.checkin(a1)                                          # an older generation
    assert anonymous.closed and a1.closed and pool.open_count == 0
    b1 = pool.checkout_as(B, "b", 1)
    pool.checkin(b1)
    pool.maintain()
    assert b1.closed and pool.open_count == 0 and pool.users() == {}
    pool.close()
    with pytest.raises(ConnectionFailure):
        pool.checkout_as(A, "a", 1)


def test_passthrough_options_are_off_by_default_and_checked(capsys: pytest.CaptureFixture[str]):
    from dvara_lib.config import parse_args
    default = parse_args([], env={})
    assert (default.auth_passthrough, default.max_user_connections) == (False, 0)
    for argv, message in ((["--auth-passthrough"], "--auth-passthrough: needs --client-auth-file or --auth-query"),
                          (["--max-user-connections", "2"], "needs --auth-passthrough")):
        with pytest.raises(SystemExit):
            parse_args(argv, env={})
        assert message in capsys.readouterr().err, argv
    on = parse_args(["--client-auth-file", "u.json", "--auth-passthrough",
                     "--max-user-connections", "2"], env={})
    assert (on.auth_passthrough, on.max_user_connections) == (True, 2)
