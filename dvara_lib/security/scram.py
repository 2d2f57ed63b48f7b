"""SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677) as MongoDB uses them: both ends.

MongoDB's variants: user names are never SASLprepped; SCRAM-SHA-1 derives its keys from
``HEX(MD5(user + ":mongo:" + password))``; SCRAM-SHA-256 from the SASLprepped password;
no channel binding (the client's GS2 header is ``n,,``); at least 4096 iterations.
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

from dvara_lib.errors import DvaraError

SHA1, SHA256 = "SCRAM-SHA-1", "SCRAM-SHA-256"
MECHANISMS = (SHA256, SHA1)
MIN_ITERATIONS = 4096
DEFAULT_ITERATIONS = {SHA256: 15000, SHA1: 10000}
_SALT_SIZE = {SHA256: 28, SHA1: 16}
_DIGEST: dict[str, Callable[..., "hashlib._Hash"]] = {SHA256: hashlib.sha256, SHA1: hashlib.sha1}
_NAME = {SHA256: "sha256", SHA1: "sha1"}
_GS2_HEADER = b"n,,"


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


# -- key derivation -------------------------------------------------------------------

def check_mechanism(mechanism: str) -> str:
    """mechanism if it is SCRAM-SHA-1 or SCRAM-SHA-256. Can raise ScramError."""
    if mechanism not in _DIGEST:
        raise ScramError(f"unsupported mechanism {mechanism!r} (use {' or '.join(MECHANISMS)})")
    return mechanism


def prepared_password(mechanism: str, username: str, password: str) -> bytes:
    """The password as the mechanism feeds it to Hi(): MD5 digest (SHA-1) or SASLprep (SHA-256)."""
    if mechanism == SHA1:
        digest = hashlib.md5(f"{username}:mongo:{password}".encode("utf-8"))
        return digest.hexdigest().encode("ascii")
    from pymongo.saslprep import saslprep
    return saslprep(password).encode("utf-8")


def salted_password(mechanism: str, prepared: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi(password, salt, i): PBKDF2-HMAC (the expensive step, done once per salt)."""
    return hashlib.pbkdf2_hmac(_NAME[mechanism], prepared, salt, iterations)


def _hmac(mechanism: str, key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, _DIGEST[mechanism]).digest()


def client_and_server_keys(mechanism: str, salted: bytes) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) from a salted password."""
    return _hmac(mechanism, salted, b"Client Key"), _hmac(mechanism, salted, b"Server Key")


def make_credential(mechanism: str, username: str, password: str,
                    iterations: Optional[int] = None, salt: Optional[bytes] = None) -> Credential:
    """A new stored credential for username/password (random salt). Can raise ScramError."""
    check_mechanism(mechanism)
    iterations = iterations or DEFAULT_ITERATIONS[mechanism]
    if iterations < MIN_ITERATIONS:
        raise ScramError(f"iterations must be at least {MIN_ITERATIONS}, got {iterations}")
    salt = salt if salt is not None else os.urandom(_SALT_SIZE[mechanism])
    salted = salted_password(mechanism, prepared_password(mechanism, username, password),
                             salt, iterations)
    client_key, server_key = client_and_server_keys(mechanism, salted)
    stored_key = _DIGEST[mechanism](client_key).digest()
    return Credential(mechanism, salt, iterations, stored_key, server_key)


# -- message syntax -------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Strict base64 decoding. Can raise ScramError."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ScramError("bad base64 in a SCRAM message") from exc


def encode_name(name: str) -> str:
    """A user name as a SCRAM saslname ("=" -> "=3D", "," -> "=2C")."""
    return name.replace("=", "=3D").replace(",", "=2C")


def decode_name(saslname: str) -> str:
    """The user name a saslname stands for. Can raise ScramError."""
    if "=" in saslname.replace("=3D", "").replace("=2C", ""):
        raise ScramError("bad escape in the SCRAM user name")
    return saslname.replace("=2C", ",").replace("=3D", "=")


def parse_attributes(message: bytes) -> list[tuple[str, str]]:
    """SCRAM ``a=value,b=value`` pairs, in order. Can raise ScramError."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScramError("SCRAM message is not UTF-8") from exc
    pairs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError(f"malformed SCRAM attribute {part[:10]!r}")
        pairs.append((part[0], part[2:]))
    return pairs


def _expect(pairs: list[tuple[str, str]], index: int, key: str) -> str:
    if len(pairs) <= index or pairs[index][0] != key:
        raise ScramError(f"SCRAM message lacks its {key}= attribute")
    return pairs[index][1]


def new_nonce() -> str:
    return b64(os.urandom(24))


# -- the client side (the proxy logging in to a server) ----------------------------------

class ScramClient:
    """One client conversation: first(), then final(server_first), then verify(server_final).

    key_cache maps (mechanism, salt, iterations) to (ClientKey, ServerKey), so a password
    is stretched once per salt, not once per connection (auth spec, "Caching credentials").
    """

    def __init__(self, mechanism: str, username: str, password: str,
                 key_cache: Optional[dict] = None, nonce: Optional[str] = None) -> None:
        self.mechanism = check_mechanism(mechanism)
        self.username = username
        self._password = password
        self._cache = key_cache if key_cache is not None else {}
        self._nonce = nonce or new_nonce()
        self._first_bare = f"n={encode_name(username)},r={self._nonce}".encode("utf-8")
        self._server_signature = b""

    def first(self) -> bytes:
        return _GS2_HEADER + self._first_bare

    def final(self, server_first: bytes) -> bytes:
        """The client-final message (with the proof). Can raise ScramError."""
        pairs = parse_attributes(server_first)
        nonce = _expect(pairs, 0, "r")
        salt = unb64(_expect(pairs, 1, "s"))
        try:
            iterations = int(_expect(pairs, 2, "i"))
        except ValueError as exc:
            raise ScramError("bad SCRAM iteration count") from exc
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("the server's nonce does not extend ours")
        if iterations < MIN_ITERATIONS:
            raise ScramError(f"server asks for {iterations} iterations, below {MIN_ITERATIONS}")
        client_key, server_key = self._keys(salt, iterations)
        without_proof = f"c={b64(_GS2_HEADER)},r={nonce}".encode("ascii")
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        stored_key = _DIGEST[self.mechanism](client_key).digest()
        signature = _hmac(self.mechanism, stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(self.mechanism, server_key, auth_message)
        return without_proof + b",p=" + b64(proof).encode("ascii")

    def verify(self, server_final: bytes) -> None:
        """Check the server proved it knows the password. Can raise ScramError."""
        pairs = parse_attributes(server_final)
        if pairs and pairs[0][0] == "e":
            raise ScramError(f"server refused the login: {pairs[0][1]}")
        verifier = unb64(_expect(pairs, 0, "v"))
        if not self._server_signature or not hmac.compare_digest(
                verifier, self._server_signature):
            raise ScramError("the server's signature is wrong: it does not know the password")

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        key = (self.mechanism, salt, iterations)
        keys = self._cache.get(key)
        if keys is None:
            prepared = prepared_password(self.mechanism, self.username, self._password)
            salted = salted_password(self.mechanism, prepared, salt, iterations)
            keys = self._cache[key] = client_and_server_keys(self.mechanism, salted)
        return keys

    def __repr__(self) -> str:
        return f"<ScramClient {self.mechanism} {self.username}>"


# -- the server side (the proxy checking a client) ---------------------------------------

class ScramServer:
    """One server conversation: first(client_first) -> server_first; final(client_final).

    credential is None for an unknown user: the conversation then goes on with a made-up
    salt (``decoy``) and fails at the proof, so that a client cannot tell unknown users from
    wrong passwords.
    """

    def __init__(self, mechanism: str, credential: Optional[Credential],
                 decoy: Callable[[str], tuple[bytes, int]]) -> None:
        self.mechanism = check_mechanism(mechanism)
        self.credential = credential
        self._decoy = decoy
        self.username: Optional[str] = None
        self._auth_prefix = b""
        self._nonce = ""
        self._gs2 = b""
        self.done = False

    @staticmethod
    def user_of(client_first: bytes) -> str:
        """The user name a client-first message names. Can raise ScramError."""
        header, bare = split_client_first(client_first)
        return decode_name(_expect(parse_attributes(bare), 0, "n"))

    def first(self, client_first: bytes) -> bytes:
        """The server-first message. Can raise ScramError."""
        self._gs2, bare = split_client_first(client_first)
        pairs = parse_attributes(bare)
        self.username = decode_name(_expect(pairs, 0, "n"))
        client_nonce = _expect(pairs, 1, "r")
        if len(pairs) > 2:
            raise ScramError("SCRAM extensions are not supported")
        if not client_nonce or any(c in client_nonce for c in ", "):
            raise ScramError("bad client nonce")
        if self.credential is not None:
            salt, iterations = self.credential.salt, self.credential.iterations
        else:
            salt, iterations = self._decoy(self.username)
        self._nonce = client_nonce + new_nonce()
        server_first = f"r={self._nonce},s={b64(salt)},i={iterations}".encode("ascii")
        self._auth_prefix = bare + b"," + server_first
        return server_first

    def final(self, client_final: bytes) -> bytes:
        """The server-final message ("v=..."). Can raise ScramError (wrong password too)."""
        if not self._auth_prefix or self.done:
            raise ScramError("SCRAM message out of order")
        head, sep, proof_text = client_final.rpartition(b",p=")
        pairs = parse_attributes(head) if sep else []
        if _expect(pairs, 0, "c") != b64(self._gs2) or _expect(pairs, 1, "r") != self._nonce:
            raise ScramError("client-final does not match this conversation")
        proof = unb64(proof_text.decode("ascii", "replace"))
        cred = self.credential
        if cred is None:
            raise ScramError("authentication failed")
        auth_message = self._auth_prefix + b"," + head
        signature = _hmac(self.mechanism, cred.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(_DIGEST[self.mechanism](client_key).digest(), cred.stored_key):
            raise ScramError("authentication failed")
        self.done = True
        return b"v=" + b64(_hmac(self.mechanism, cred.server_key, auth_message)).encode("ascii")


def split_client_first(message: bytes) -> tuple[bytes, bytes]:
    """(GS2 header, client-first-bare). Can raise ScramError.

    Only ``n,,`` and ``y,,`` are accepted: no channel binding, no authorization identity.
    """
    if message.startswith((b"n,,", b"y,,")):
        return message[:3], message[3:]
    if message.startswith(b"p="):
        raise ScramError("channel binding is not supported")
    raise ScramError("unsupported GS2 header (authorization identities are not supported)")


def payload_bytes(payload: Any) -> bytes:
    """A SASL payload as bytes (drivers send BSON binary, some base64 text)."""
    if isinstance(payload, str):
        return unb64(payload)
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    raise ScramError("SASL reply without a payload")
