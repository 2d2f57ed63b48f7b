"""TLS contexts: the listeners' (clients of the proxy) and the proxy's own server connections'.

# design:
# Only contexts are built here, from the settings, so a bad certificate or key file
# stops the start with a message naming its option. The handshake with clients runs in
# the acceptor (dvara_lib.proxy.clienttls); server connections are wrapped by the
# dvara_lib.backend.connect.Backend that opens them.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Optional

from dvara_lib.errors import ConfigError

if TYPE_CHECKING:
    from dvara_lib.config import Settings

DISABLED, ALLOW, REQUIRE = "disabled", "allow", "require"


def listener_context(settings: "Settings") -> Optional[ssl.SSLContext]:
    """The listeners' context, None unless --tls-mode is allow or require. Can raise
    ConfigError naming the option."""
    return None if settings.tls_mode == DISABLED else server_context(settings)


def backend_context_or_none(settings: "Settings") -> Optional[ssl.SSLContext]:
    """The server connections' context, None without --backend-tls. Can raise
    ConfigError naming the option."""
    return backend_context(settings) if settings.backend_tls else None


def server_context(settings: "Settings") -> ssl.SSLContext:
    """The listeners' context. Can raise ConfigError naming the option."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    _load(ctx.load_cert_chain, "--tls-cert-file/--tls-key-file", settings.tls_cert_file,
          settings.tls_key_file)
    if settings.tls_ca_file:
        _load(ctx.load_verify_locations, "--tls-ca-file", settings.tls_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.tls_require_client_cert \
            else ssl.CERT_OPTIONAL
    return ctx


def backend_context(settings: "Settings") -> ssl.SSLContext:
    """The context of server connections (checks the server's certificate and name).

    Can raise ConfigError naming the option.
    """
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.backend_tls_ca_file:
        _load(ctx.load_verify_locations, "--backend-tls-ca-file", settings.backend_tls_ca_file)
    if settings.backend_tls_cert_file:
        _load(ctx.load_cert_chain, "--backend-tls-cert-file/--backend-tls-key-file",
              settings.backend_tls_cert_file, settings.backend_tls_key_file)
    return ctx


def _load(fn, option: str, *paths: Optional[str]) -> None:
    try:
        fn(*paths)
    except (OSError, ssl.SSLError) as exc:
        shown = ", ".join(p for p in paths if p)
        raise ConfigError(f"{option}: cannot load {shown}: {exc.strerror or exc}") from exc
