"""Unit tests: SCRAM both ends (auth spec vectors), the user file, the failure limiter."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pytest

from dvara_lib.security import scram
from dvara_lib.security import userfile
from dvara_lib.proxy.gate import FailureLimiter
from dvara_lib.errors import ConfigError

# The example conversations of the MongoDB auth spec ("SCRAM-SHA-1", "SCRAM-SHA-256").
SHA1_VECTOR = (
    "fyko+d2lbbFgONRv9qkxdawL",
    b"r=fyko+d2lbbFgONRv9qkxdawLHo+Vgk7qvUOKUwuWLIWg4l/9SraGMHEE,s=rQ9ZY3MntBeuP3E1TDVC4w==,"
    b"i=10000",
    b"c=biws,r=fyko+d2lbbFgONRv9qkxdawLHo+Vgk7qvUOKUwuWLIWg4l/9SraGMHEE,"
    b"p=MC2T8BvbmWRckDw8oWl5IVghwCY=",
    b"v=UMWeI25JD1yNYZRMpZ4VHvhZ9e0=")
SHA256_VECTOR = (
    "rOprNGfwEbeRWgbNEkqO",
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


@pytest.mark.parametrize("mechanism,vector", [(scram.SHA1, SHA1_VECTOR),
                                              (scram.SHA256, SHA256_VECTOR)])
def test_client_matches_the_auth_spec_conversation(mechanism, vector):
    nonce, server_first, client_final, server_final = vector
    client = scram.ScramClient(mechanism, "user", "pencil", nonce=nonce)
    assert client.first() == f"n,,n=user,r={nonce}".encode()
    assert client.final(server_first) == client_final
    client.verify(server_final)


@pytest.mark.parametrize("mechanism,vector", [(scram.SHA1, SHA1_VECTOR),
                                              (scram.SHA256, SHA256_VECTOR)])
def test_client_refuses_a_server_that_does_not_know_the_password(mechanism, vector):
    nonce, server_first, _, _ = vector
    client = scram.ScramClient(mechanism, "user", "pencil", nonce=nonce)
    client.final(server_first)
    with pytest.raises(scram.ScramError, match="signature"):
        client.verify(b"v=" + scram.b64(b"\0" * 20).encode())
    client = scram.ScramClient(mechanism, "user", "pencil", nonce=nonce)
    client.final(server_first)
    with pytest.raises(scram.ScramError, match="refused"):
        client.verify(b"e=invalid-proof")


def test_client_refuses_few_iterations_and_foreign_nonces():
    client = scram.ScramClient(scram.SHA256, "user", "pencil", nonce="abc")
    with pytest.raises(scram.ScramError, match="4096"):
        client.final(b"r=abcdef,s=" + scram.b64(b"salt" * 4).encode() + b",i=4095")
    client = scram.ScramClient(scram.SHA256, "user", "pencil", nonce="abc")
    with pytest.raises(scram.ScramError, match="nonce"):
        client.final(b"r=xyzdef,s=" + scram.b64(b"salt" * 4).encode() + b",i=4096")


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
@pytest.mark.parametrize("name", ["app", "a,b=c", "\u2168"])
def test_server_accepts_the_right_password_only(mechanism, name):
    cred = scram.make_credential(mechanism, name, "p\u00e4ss")
    decoy = lambda user: b"s" * 32  # noqa: E731

    def converse(password: str) -> bytes:
        server = scram.ScramServer(mechanism, cred, decoy)
        client = scram.ScramClient(mechanism, name, password)
        server_first = server.first(client.first())
        assert server.username == name
        server_final = server.final(client.final(server_first))
        client.verify(server_final)
        return server_final

    assert converse("p\u00e4ss").startswith(b"v=")
    with pytest.raises(scram.ScramError, match="authentication failed"):
        converse("pass")


def test_sha256_passwords_are_saslprepped():
    """The auth spec's SASLprep cases: "I\\u00ADX" logs in as "IX"."""
    cred = scram.make_credential(scram.SHA256, "IX", "IX")
    server = scram.ScramServer(scram.SHA256, cred, lambda u: b"")
    client = scram.ScramClient(scram.SHA256, "IX", "I\u00adX")
    client.verify(server.final(client.final(server.first(client.first()))))


@pytest.mark.parametrize("mechanism, salt_size, iterations",
                         [(scram.SHA256, 28, 15000), (scram.SHA1, 16, 10000)])
def test_unknown_user_looks_like_a_wrong_password(mechanism, salt_size, iterations):
    """The decoy has the salt size and iteration count of a real user of the mechanism."""
    seen = []

    def decoy(user: str) -> bytes:
        seen.append(user)
        return bytes(range(32))

    real = scram.make_credential(mechanism, "someone", "pw")
    assert (len(real.salt), real.iterations) == (salt_size, iterations)
    server = scram.ScramServer(mechanism, None, decoy)
    client = scram.ScramClient(mechanism, "ghost", "x")
    server_first = server.first(client.first())
    salt = scram.b64(bytes(range(salt_size))).encode()
    assert b",s=" + salt + b",i=" + str(iterations).encode() in server_first
    with pytest.raises(scram.ScramError, match="authentication failed"):
        server.final(client.final(server_first))
    assert seen == ["ghost"]


@pytest.mark.parametrize("first", [b"p=tls-unique,,n=u,r=x", b"n,a=admin,n=u,r=x", b"n,,r=x",
                                   b"n,,n=u,r=x,m=ext", b"n,,n=a=bc,r=x", b"garbage"])
def test_server_refuses_malformed_or_unsupported_client_first(first):
    with pytest.raises(scram.ScramError):
        scram.ScramServer(scram.SHA256, None, lambda u: b"s" * 32).first(first)


def test_server_refuses_a_replayed_or_tampered_final():
    """A tampered final fails and ends its conversation; a good one works once."""
    cred = scram.make_credential(scram.SHA256, "u", "pw")
    for tampered in (True, False):
        server = scram.ScramServer(scram.SHA256, cred, lambda u: b"")
        client = scram.ScramClient(scram.SHA256, "u", "pw")
        final = client.final(server.first(client.first()))
        if tampered:
            with pytest.raises(scram.ScramError, match="does not match"):
                server.final(final.replace(b"c=biws", b"c=eSws"))
            with pytest.raises(scram.ScramError, match="out of order"):
                server.final(final)
    server.final(final)
    with pytest.raises(scram.ScramError, match="out of order"):
        server.final(final)


def test_credential_repr_hides_keys():
    cred = scram.make_credential(scram.SHA256, "u", "pw")
    assert scram.b64(cred.stored_key) not in repr(cred)
    assert "stored_key" not in repr(cred) and "server_key" not in repr(cred)


# -- the user file --------------------------------------------------------------------

def test_user_file_round_trip_holds_no_password(tmp_path: Path):
    path = tmp_path / "users.json"
    users = {u.key: u for u in (userfile.make_user("app", "Secret-1"),
                                userfile.make_user("ro", "Secret-2", db="reports",
                                                   read_only=True, mechanisms=[scram.SHA256]))}
    userfile.save(str(path), users)
    text = path.read_text()
    assert "Secret-1" not in text and "Secret-2" not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = userfile.load(str(path))
    assert loaded[("admin", "app")].mechanisms == [scram.SHA256, scram.SHA1]
    assert loaded[("reports", "ro")].read_only and loaded[("reports", "ro")].mechanisms == [
        scram.SHA256]
    assert loaded == users


@pytest.mark.parametrize("content,message", [
    ("not json", "cannot read"),
    ('{"version": 2, "users": []}', "not a dvara user file"),
    ('{"version": 1, "users": [{"user": "x"}]}', "no SCRAM credentials"),
    ('{"version": 1, "users": [{"user": "x", "SCRAM-SHA-256": {"salt": "AA==", '
     '"iterations": 100, "storedKey": "AA==", "serverKey": "AA=="}}]}', "below 4096"),
])
def test_bad_user_files_are_config_errors(tmp_path: Path, content: str, message: str):
    path = tmp_path / "users.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        userfile.load(str(path))


def test_missing_user_file_says_how_to_make_one(tmp_path: Path):
    with pytest.raises(ConfigError, match="dvara adduser"):
        userfile.load(str(tmp_path / "nope.json"))


def test_user_file_reloads_when_it_changes(tmp_path: Path):
    path = tmp_path / "users.json"
    userfile.save(str(path), {("admin", "a"): userfile.make_user("a", "pw")})
    users = userfile.UserFile(str(path))
    assert users.get("admin", "b") is None
    doc = json.loads(path.read_text())
    userfile.save(str(path), {("admin", "a"): userfile.make_user("a", "pw"),
                              ("admin", "b"): userfile.make_user("b", "pw")})
    assert users.get("admin", "b") is not None
    path.write_text("broken")                     # a bad edit keeps the previous users
    assert users.get("admin", "b") is not None
    assert doc["version"] == 1


# A user file entry written by dvara adduser before dvara used scramp (the hand-written
# SCRAM code; salts fixed): user "legacy", password "Old-pa55\u00e4".
LEGACY_ENTRY = {
    "user": "legacy", "db": "admin", "read_only": False,
    "SCRAM-SHA-256": {"salt": "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQQ==", "iterations": 15000,
                      "storedKey": "GnUA/c8p0wGDMfw9RHylGDDP2MQ+c+S2vU/x/gsGOrk=",
                      "serverKey": "Dlna7jLpm6VD8BqSu2tCd5Gpd+6GIkZdEh2807bCPjI="},
    "SCRAM-SHA-1": {"salt": "QkJCQkJCQkJCQkJCQkJCQg==", "iterations": 10000,
                    "storedKey": "y6XTiGo1eCEqj9s6IzGjqbbuEfU=",
                    "serverKey": "PkH4DnCL/siJJfH/XGxWCQXudO4="}}


def logs_in(mechanism: str, cred: scram.Credential, name: str, password: str) -> bool:
    """One whole conversation; False when the server refuses the proof."""
    server = scram.ScramServer(mechanism, cred, lambda u: (b"", 0))
    client = scram.ScramClient(mechanism, name, password)
    final = client.final(server.first(client.first()))
    try:
        server_final = server.final(final)
    except scram.ScramError as exc:
        assert str(exc) == "authentication failed"
        return False
    client.verify(server_final)
    return True


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
def test_user_files_made_before_scramp_still_log_in(tmp_path: Path, mechanism: str):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"version": 1, "users": [LEGACY_ENTRY]}))
    cred = userfile.load(str(path))[("admin", "legacy")].credentials[mechanism]
    salt = scram.unb64(LEGACY_ENTRY[mechanism]["salt"])
    assert scram.make_credential(mechanism, "legacy", "Old-pa55\u00e4", salt=salt) == cred
    assert logs_in(mechanism, cred, "legacy", "Old-pa55\u00e4")
    assert not logs_in(mechanism, cred, "legacy", "Old-pa55a")


def test_sha1_passwords_are_not_saslprepped():
    """MongoDB's SCRAM-SHA-1 hashes the password as typed: "I\u00adX" is not "IX"."""
    cred = scram.make_credential(scram.SHA1, "u", "I\u00adX")
    assert logs_in(scram.SHA1, cred, "u", "I\u00adX")
    assert not logs_in(scram.SHA1, cred, "u", "IX")
    assert logs_in(scram.SHA256, scram.make_credential(scram.SHA256, "u", "I\u00adX"), "u", "IX")


def test_user_names_sasl_prep_refuses_cannot_be_added():
    with pytest.raises(scram.ScramError, match="SASLprep"):
        userfile.make_user("smile\U0001F600", "pw")
    assert userfile.make_user("\u2168", "pw").name == "\u2168"   # kept, not made "IX"


# -- the failure limiter ---------------------------------------------------------------

def test_failure_limiter_counts_per_ip_and_forgets_after_the_window(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("dvara_lib.proxy.gate.time.monotonic", lambda: now[0])
    limiter = FailureLimiter(3, window=60.0, max_ips=2)
    for n in (1, 2):
        assert limiter.failed("10.0.0.1") == n
    assert not limiter.blocked("10.0.0.1")
    assert limiter.failed("10.0.0.1") == 3
    assert limiter.blocked("10.0.0.1") and not limiter.blocked("10.0.0.2")
    now[0] += 61
    assert not limiter.blocked("10.0.0.1")
    assert limiter.failed("10.0.0.2") == 1
    assert limiter.failed("10.0.0.3") == 1        # the table stays bounded
    assert len(limiter._counts) <= 2


# -- SCRAM pass-through: the ClientKey recovered, the key-based login ---------------------

# RFC 5802's SCRAM-SHA-1 example: keys from the plain password "pencil" (no MongoDB digest).
RFC5802_VECTOR = (
    "fyko+d2lbbFgONRv9qkxdawL",
    b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")


def _keys(mechanism: str, password: str, salt: bytes, iterations: int
          ) -> tuple[bytes, scram.Credential]:
    """The ClientKey and the stored credential of password, computed by hand (RFC 5802)."""
    name = {scram.SHA1: "sha1", scram.SHA256: "sha256"}[mechanism]
    salted = hashlib.pbkdf2_hmac(name, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", name).digest()
    server_key = hmac.new(salted, b"Server Key", name).digest()
    stored_key = hashlib.new(name, client_key).digest()
    return client_key, scram.Credential(mechanism, salt, iterations, stored_key, server_key)


def _vector_keys(mechanism: str, vector: tuple, password: str) -> tuple[bytes, scram.Credential]:
    fields = dict(f.split("=", 1) for f in vector[1].decode().split(","))
    return _keys(mechanism, password, scram.unb64(fields["s"]), int(fields["i"]))


@pytest.mark.parametrize("mechanism,vector,password", [
    (scram.SHA1, SHA1_VECTOR, scram.prepared_password(scram.SHA1, "user", "pencil")),
    (scram.SHA1, RFC5802_VECTOR, "pencil"),
    (scram.SHA256, SHA256_VECTOR, "pencil")])                        # = RFC 7677's example
def test_key_client_logs_in_with_keys_as_the_password_would(mechanism, vector, password):
    nonce, server_first, client_final, server_final = vector
    client_key, credential = _vector_keys(mechanism, vector, password)
    client = scram.ScramKeyClient(credential, "user", client_key, nonce=nonce)
    assert client.first() == f"n,,n=user,r={nonce}".encode()
    assert client.final(server_first) == client_final
    client.verify(server_final)
    with pytest.raises(scram.ScramError, match="signature"):
        client.verify(b"v=" + scram.b64(b"\0" * len(client_key)).encode())
    with pytest.raises(scram.ScramError, match="refused"):
        client.verify(b"e=invalid-proof")
    assert client_key.hex() not in repr(client) and scram.b64(client_key) not in repr(client)


@pytest.mark.parametrize("mechanism,vector", [(scram.SHA1, SHA1_VECTOR),
                                              (scram.SHA256, SHA256_VECTOR)])
def test_key_client_refuses_a_server_verifier_that_differs(mechanism, vector):
    nonce, server_first, _, _ = vector
    client_key, credential = _vector_keys(mechanism, vector, "pencil")
    other = scram.Credential(mechanism, credential.salt + b"x", credential.iterations,
                             credential.stored_key, credential.server_key)
    with pytest.raises(scram.ScramError, match="differs from dvara's"):
        scram.ScramKeyClient(other, "user", client_key, nonce=nonce).final(server_first)
    with pytest.raises(scram.ScramError, match="nonce"):
        scram.ScramKeyClient(credential, "user", client_key, nonce="zzz").final(server_first)


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
@pytest.mark.parametrize("name", ["app", "a=b,c"])
def test_server_recovers_the_client_key_and_the_key_client_logs_in_with_it(mechanism, name):
    credential = scram.make_credential(mechanism, name, "s3cret", 4096, b"s" * 16)
    expected, _ = _keys(mechanism, scram.prepared_password(mechanism, name, "s3cret"),
                        b"s" * 16, 4096)
    server = scram.ScramServer(mechanism, credential, lambda _: b"d" * 32,
                               keep_client_key=True)
    client = scram.ScramClient(mechanism, name, "s3cret")
    client.verify(server.final(client.final(server.first(client.first()))))
    assert server.client_key == expected
    again = scram.ScramServer(mechanism, credential, lambda _: b"d" * 32)
    key_client = scram.ScramKeyClient(credential, name, server.client_key)
    key_client.verify(again.final(key_client.final(again.first(key_client.first()))))
    assert again.client_key is None                   # kept only when asked for


def test_recover_client_key_refuses_a_wrong_proof():
    client_key, credential = _keys(scram.SHA256, "pencil", b"salt" * 4, 4096)
    message = b"n=user,r=a,r=ab,s=c2FsdA==,i=4096,c=biws,r=ab"
    proof = bytes(a ^ b for a, b in zip(client_key, hmac.new(
        credential.stored_key, message, "sha256").digest()))
    assert scram.recover_client_key(scram.SHA256, credential.stored_key, message,
                                    proof) == client_key
    assert scram.recover_client_key(scram.SHA256, credential.stored_key, message + b"x",
                                    proof) is None
    assert scram.recover_client_key(scram.SHA256, credential.stored_key, message,
                                    proof[:-1]) is None
