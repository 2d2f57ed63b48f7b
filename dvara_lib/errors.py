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
