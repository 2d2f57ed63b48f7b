"""Observability: metrics, their sinks (Ganglia), the emitter, the admin endpoint and `dvara status`."""
