"""The errors dvara raises, in one small tree."""

from __future__ import annotations


class DvaraError(Exception):
    """Base class of every error dvara raises."""


class ConfigError(DvaraError):
    """A configuration value is invalid; the message names the option."""


class ProtocolError(DvaraError):
    """A peer sent bytes that are not a valid MongoDB wire message."""


class ConnectionFailure(DvaraError):
    """A socket to a server failed (refused, reset, closed or timed out)."""


class ServerTimeout(ConnectionFailure):
    """A server did not answer within --message-timeout."""


class AuthenticationFailure(ConnectionFailure):
    """The proxy could not log in to a server with its own account (--username)."""


class AuthQueryFailure(DvaraError):
    """--auth-query could not look a user up on the servers (unreachable, refused)."""


class PoolTimeout(DvaraError):
    """No server connection could be checked out within --pool-wait-timeout."""


class DiscoveryError(DvaraError):
    """The replica set could not be discovered from the seeds."""


class HaltServer(BaseException):
    """Stop the whole process with an exit status (raised only in the main thread)."""

    def __init__(self, reason: str, exit_status: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


# -- MongoDB error codes dvara answers with (the server's error_codes.yml) -----------------

HOST_UNREACHABLE = 6
UNAUTHORIZED = 13
AUTHENTICATION_FAILED = 18
COMMAND_NOT_FOUND = 59
INCOMPATIBLE_SERVER_VERSION = 188
EXCEEDED_TIME_LIMIT = 262
MECHANISM_UNAVAILABLE = 334

CODE_NAMES = {
    HOST_UNREACHABLE: "HostUnreachable", UNAUTHORIZED: "Unauthorized",
    AUTHENTICATION_FAILED: "AuthenticationFailed",
    COMMAND_NOT_FOUND: "CommandNotFound",
    INCOMPATIBLE_SERVER_VERSION: "IncompatibleServerVersion",
    EXCEEDED_TIME_LIMIT: "ExceededTimeLimit", MECHANISM_UNAVAILABLE: "MechanismUnavailable",
}


def error_doc(code: int, errmsg: str, retryable: bool = False) -> dict:
    """The reply document of a command that failed with code (drivers read codeName, and
    retry a write the RetryableWriteError label marks)."""
    doc = {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": CODE_NAMES[code]}
    if retryable:
        doc["errorLabels"] = ["RetryableWriteError"]
    return doc
