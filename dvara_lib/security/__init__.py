"""Security: SCRAM, the user file, TLS contexts, the proxy's own login."""
