"""SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677) as MongoDB uses them: both ends.

The protocol is ``scramp``'s (the SCRAM library pg8000 uses): message building and
parsing, the GS2 header check, nonces, iteration-count and salt checks, proofs, server
signatures and stored-key derivation. What stays here is what MongoDB does differently:

- SCRAM-SHA-1 derives its keys from ``HEX(MD5(user + ":mongo:" + password))``, not from
  the password (``prepared_password``). scramp SASLpreps every password; the hex digest is
  ASCII letters and digits, which SASLprep leaves as they are, so it goes in unchanged.
  SCRAM-SHA-256 hands the plain password to scramp, which SASLpreps it as MongoDB does.
- User names are never SASLprepped (drivers and mongod send and look up the name as
  given; scramp would NFKC-normalise it, so that "\\u2168" became "IX"). The client
  sends the name through ``_MongoName``; the server looks the user up by the raw name
  (``user_of``/``decode_name``). scramp's server still parses the name and refuses one
  SASLprep prohibits (unassigned in Unicode 3.2, such as emoji, or control characters):
  ``dvara adduser`` therefore refuses to create such users (``check_user_name``).
- No channel binding: the client's GS2 header is ``n,,`` (scramp's default without a
  binding); the server takes ``n,,`` and ``y,,``.
- An unknown user gets a decoy credential (a made-up salt, random keys) so that the
  conversation fails at the proof, like a wrong password.
- Error texts are dvara's (``ScramError``): clients only ever see "Authentication failed."

Left out on purpose: the former per-salt cache of ClientKey/ServerKey in the client.
scramp derives the keys inside ``get_client_final`` with no hook to reuse them, so each
server connection the proxy logs in costs one PBKDF2 (about 8 ms of CPU at 15000
iterations of SHA-256, outside the GIL) instead of one per process and salt.
``ScramClient`` is the proxy logging in to a server; ``ScramServer`` is the proxy checking
a client against stored keys (it never sees or keeps a password).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import scramp
from scramp.core import Username
from scramp.utils import ServerError, saslprep

from dvara_lib.errors import DvaraError

SHA1, SHA256 = "SCRAM-SHA-1", "SCRAM-SHA-256"
MECHANISMS = (SHA256, SHA1)
MIN_ITERATIONS = 4096
DEFAULT_ITERATIONS = {SHA256: 15000, SHA1: 10000}
_SALT_SIZE = {SHA256: 28, SHA1: 16}          # what mongod uses
_DIGEST_SIZE = {SHA256: 32, SHA1: 20}
_HASHES = {SHA256: "sha256", SHA1: "sha1"}
_GS2_HEADERS = ("n,,", "y,,")
_FAILED = "authentication failed"
_MISMATCH = "client-final does not match this conversation"
_SERVER_ERRORS = {ServerError.INVALID_PROOF: _FAILED,
                  ServerError.CHANNEL_BINDINGS_DONT_MATCH: _MISMATCH}


class ScramError(DvaraError):
    """A SCRAM conversation failed: bad message, wrong proof, or a server that lied."""


@dataclass(frozen=True)
class Credential:
    """What a server keeps for one user and mechanism: never the password itself."""

    mechanism: str
    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """The tuple a scramp server's auth_fn returns."""
        return self.salt, self.stored_key, self.server_key, self.iterations


# -- what MongoDB does differently ------------------------------------------------------

def check_mechanism(mechanism: str) -> str:
    """mechanism if it is SCRAM-SHA-1 or SCRAM-SHA-256. Can raise ScramError."""
    if mechanism not in MECHANISMS:
        raise ScramError(f"unsupported mechanism {mechanism!r} (use {' or '.join(MECHANISMS)})")
    return mechanism


def prepared_password(mechanism: str, username: str, password: str) -> str:
    """What scramp gets as the password: MongoDB's MD5 digest (SHA-1) or the password."""
    if mechanism == SHA1:
        return hashlib.md5(f"{username}:mongo:{password}".encode("utf-8")).hexdigest()
    return password


def check_user_name(name: str) -> str:
    """name if dvara's SCRAM server can take it (see the module docstring). Can raise
    ScramError."""
    try:
        saslprep(name)
    except scramp.ScramException as exc:
        raise ScramError(f"user name {name!r} cannot log in by SCRAM here: SASLprep "
                         f"refuses it ({exc.args[0]})") from exc
    return name


def make_credential(mechanism: str, username: str, password: str,
                    iterations: Optional[int] = None, salt: Optional[bytes] = None) -> Credential:
    """A new stored credential for username/password (random salt). Can raise ScramError."""
    check_mechanism(mechanism)
    iterations = iterations or DEFAULT_ITERATIONS[mechanism]
    if iterations < MIN_ITERATIONS:
        raise ScramError(f"iterations must be at least {MIN_ITERATIONS}, got {iterations}")
    salt = salt if salt is not None else os.urandom(_SALT_SIZE[mechanism])
    try:
        salt, stored, server, i = scramp.ScramMechanism(mechanism).make_auth_info(
            prepared_password(mechanism, username, password), iterations, salt)
    except scramp.ScramException as exc:
        raise ScramError(f"cannot make a {mechanism} credential: {exc.args[0]}") from exc
    return Credential(mechanism, salt, i, stored, server)


def decoy_credential(mechanism: str, seed: bytes) -> Credential:
    """A credential no password matches (random keys), for an unknown user: its salt is
    taken from seed (at least 28 stable bytes per user) and it has the salt size and
    iteration count a real user of that mechanism has, so that nothing tells them apart."""
    size = _DIGEST_SIZE[mechanism]
    return Credential(mechanism, seed[:_SALT_SIZE[mechanism]], DEFAULT_ITERATIONS[mechanism],
                      os.urandom(size), os.urandom(size))


# -- message syntax -------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Strict base64 decoding. Can raise ScramError."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ScramError("bad base64 in a SCRAM message") from exc


def decode_name(saslname: str) -> str:
    """The user name a saslname stands for, not SASLprepped. Can raise ScramError."""
    if "=" in saslname.replace("=3D", "").replace("=2C", ""):
        raise ScramError("bad escape in the SCRAM user name")
    return saslname.replace("=2C", ",").replace("=3D", "=")


def _text(message: bytes) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScramError("SCRAM message is not UTF-8") from exc


def _error(exc: scramp.ScramException) -> ScramError:
    """dvara's error for one of scramp's."""
    text = _SERVER_ERRORS.get(exc.server_error) or f"bad SCRAM message: {exc.args[0]}"
    return ScramError(text)


# -- the client side (the proxy logging in to a server) ----------------------------------

class _MongoName(Username):
    """A user name as MongoDB sends it: escaped, never SASLprepped."""

    def __init__(self, name: str) -> None:
        self.username = name                  # not super().__init__: that SASLpreps


class ScramClient:
    """One client conversation: first(), then final(server_first), then verify(server_final).

    A step that failed ends the conversation (scramp does not go back a step).
    """

    def __init__(self, mechanism: str, username: str, password: str,
                 nonce: Optional[str] = None) -> None:
        self.mechanism = check_mechanism(mechanism)
        self.username = username
        try:
            self._scram = scramp.ScramClient(
                [mechanism], "-", prepared_password(mechanism, username, password),
                c_nonce=nonce)
        except scramp.ScramException as exc:
            raise ScramError(f"cannot log in as {username!r}: {exc.args[0]}") from exc
        self._scram.username = _MongoName(username)
        self._first = self._scram.get_client_first().encode("utf-8")

    def first(self) -> bytes:
        return self._first

    def final(self, server_first: bytes) -> bytes:
        """The client-final message (with the proof). Can raise ScramError."""
        try:
            self._scram.set_server_first(_text(server_first))
            return self._scram.get_client_final().encode("utf-8")
        except scramp.ScramException as exc:
            raise ScramError(f"bad server-first message: {exc.args[0]}") from exc

    @property
    def server_salt(self) -> tuple[bytes, int]:
        """The salt and iteration count the server-first message announced (after
        final()): what a verifier must use to match the server's."""
        return bytes(self._scram.salt), int(self._scram.iterations)

    def verify(self, server_final: bytes) -> None:
        """Check the server proved it knows the password. Can raise ScramError."""
        text = _text(server_final)
        if text.startswith("e="):
            raise ScramError(f"server refused the login: {text[2:]}")
        try:
            self._scram.set_server_final(text)
        except scramp.ScramException as exc:
            raise ScramError("the server's signature is wrong: it does not know the "
                             f"password ({exc.args[0]})") from exc

    def __repr__(self) -> str:
        return f"<ScramClient {self.mechanism} {self.username}>"


class ScramKeyClient:
    """A client conversation that logs in with a user's ClientKey and ServerKey instead
    of a password (SCRAM pass-through): the same steps as ScramClient. The server's salt
    and iteration count must be the credential's (else the keys cannot match). The
    keys are never logged and not in repr."""

    def __init__(self, credential: Credential, username: str, client_key: bytes,
                 nonce: Optional[str] = None) -> None:
        self.mechanism = check_mechanism(credential.mechanism)
        self.username = username
        self._credential = credential
        self._client_key = client_key
        self._nonce = nonce or b64(os.urandom(24))
        name = username.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={name},r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return f"n,,{self._first_bare}".encode("utf-8")

    def final(self, server_first: bytes) -> bytes:
        """The client-final message (with the proof). Can raise ScramError."""
        text = _text(server_first)
        nonce, salt, iterations = _parse_server_first(text, self._nonce)
        c = self._credential
        if (salt, iterations) != (c.salt, c.iterations):
            raise ScramError(f"the server's {self.mechanism} verifier for {self.username!r} "
                             "differs from dvara's (salt or iteration count): add the user "
                             "again with dvara adduser --from-server")
        without_proof = f"c=biws,r={nonce}"
        message = f"{self._first_bare},{text},{without_proof}".encode("utf-8")
        signature = _hmac(self.mechanism, c.stored_key, message)
        proof = bytes(a ^ b for a, b in zip(self._client_key, signature))
        self._server_signature = _hmac(self.mechanism, c.server_key, message)
        return f"{without_proof},p={b64(proof)}".encode("utf-8")

    def verify(self, server_final: bytes) -> None:
        """Check the server holds the user's ServerKey. Can raise ScramError."""
        signature = unb64(_server_fields(_text(server_final)).get("v", ""))
        if not self._server_signature or not hmac.compare_digest(signature,
                                                                 self._server_signature):
            raise ScramError("the server's signature is wrong: it does not hold the "
                             "user's key")

    def __repr__(self) -> str:
        return f"<ScramKeyClient {self.mechanism} {self.username}>"


def _parse_server_first(text: str, client_nonce: str) -> tuple[str, bytes, int]:
    """The nonce, salt and iteration count of a server-first message. Can raise
    ScramError."""
    fields = _server_fields(text)
    try:
        nonce, salt, iterations = fields["r"], unb64(fields["s"]), int(fields["i"])
    except (KeyError, ValueError) as exc:
        raise ScramError("bad server-first message") from exc
    if not nonce.startswith(client_nonce) or len(nonce) <= len(client_nonce):
        raise ScramError("bad server-first message: the nonce is not this conversation's")
    if iterations < MIN_ITERATIONS:
        raise ScramError(f"bad server-first message: iterations below {MIN_ITERATIONS}")
    return nonce, salt, iterations


def _server_fields(text: str) -> dict[str, str]:
    """The attributes of a server's SCRAM message. Can raise ScramError (an "e=" error
    message: the server refused the login)."""
    if text.startswith("e="):
        raise ScramError(f"server refused the login: {text[2:]}")
    return dict(f.split("=", 1) for f in text.split(",") if "=" in f)


def _hmac(mechanism: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, _HASHES[mechanism]).digest()


def _digest(mechanism: str, data: bytes) -> bytes:
    return hashlib.new(_HASHES[mechanism], data).digest()


def recover_client_key(mechanism: str, stored_key: bytes, auth_message: bytes,
                       proof: bytes) -> Optional[bytes]:
    """The ClientKey a client proved it holds (ClientProof XOR HMAC(StoredKey,
    AuthMessage)), or None if H(ClientKey) is not StoredKey (a wrong password)."""
    signature = _hmac(mechanism, stored_key, auth_message)
    if len(proof) != len(signature):
        return None
    key = bytes(a ^ b for a, b in zip(proof, signature))
    return key if hmac.compare_digest(_digest(mechanism, key), stored_key) else None


# -- the server side (the proxy checking a client) ---------------------------------------

class ScramServer:
    """One server conversation: first(client_first) -> server_first; final(client_final).

    credential is None for an unknown user: the conversation then goes on with a made-up
    salt (``decoy``) and random keys, and fails at the proof, so that a client cannot tell
    unknown users from wrong passwords. A failed step ends the conversation.
    """

    def __init__(self, mechanism: str, credential: Optional[Credential],
                 decoy: Callable[[str], bytes], keep_client_key: bool = False) -> None:
        self.mechanism = check_mechanism(mechanism)
        self.credential = credential
        self._decoy = decoy
        self._keep_client_key = keep_client_key
        self.client_key: Optional[bytes] = None     # after a login, with keep_client_key
        self.username: Optional[str] = None
        self._scram: Any = None
        self.done = False

    @staticmethod
    def user_of(client_first: bytes) -> str:
        """The user name a client-first message names (as sent). Can raise ScramError."""
        text = _text(client_first)
        if not text.startswith(_GS2_HEADERS):
            raise ScramError("unsupported GS2 header (no channel binding, no "
                             "authorization identity)")
        name = text[3:].split(",", 1)[0]
        if not name.startswith("n="):
            raise ScramError("SCRAM client-first lacks its n= attribute")
        return decode_name(name[2:])

    def first(self, client_first: bytes) -> bytes:
        """The server-first message. Can raise ScramError."""
        if self._scram is not None:
            raise ScramError("SCRAM message out of order")
        self.username = self.user_of(client_first)
        credential = self.credential or decoy_credential(self.mechanism,
                                                         self._decoy(self.username))
        self._scram = scramp.ScramMechanism(self.mechanism).make_server(
            lambda _prepped_name: credential.auth_info())
        try:
            self._scram.set_client_first(_text(client_first))
            return self._scram.get_server_first().encode("utf-8")
        except scramp.ScramException as exc:
            self.done = True
            raise _error(exc) from exc

    def final(self, client_final: bytes) -> bytes:
        """The server-final message ("v=..."). Can raise ScramError (wrong password too)."""
        if self._scram is None or self.done:
            raise ScramError("SCRAM message out of order")
        self.done = True
        try:
            self._scram.set_client_final(_text(client_final))
            server_final = self._scram.get_server_final()
        except scramp.ScramException as exc:
            raise _error(exc) from exc
        if self.credential is None:           # cannot happen: the decoy keys are random
            raise ScramError(_FAILED)
        if self._keep_client_key:
            self.client_key = self._client_key_of(_text(client_final))
        return server_final.encode("utf-8")

    def _client_key_of(self, client_final: str) -> bytes:
        """The ClientKey of the client whose proof was just accepted. Can raise
        ScramError."""
        without_proof, _, proof = client_final.rpartition(",p=")
        message = ",".join((self._scram.client_first_bare, self._scram.server_first,
                            without_proof)).encode("utf-8")
        assert self.credential is not None
        key = recover_client_key(self.mechanism, self.credential.stored_key, message,
                                 unb64(proof))
        if key is None:                       # scramp accepted it: cannot happen
            raise ScramError(_FAILED)
        return key


def payload_bytes(payload: Any) -> bytes:
    """A SASL payload as bytes (drivers send BSON binary, some base64 text)."""
    if isinstance(payload, str):
        return unb64(payload)
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    raise ScramError("SASL reply without a payload")
