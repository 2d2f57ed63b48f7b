"""Observability: metrics, their sinks (Ganglia), the emitter, the admin endpoint and `dvara status`.

# design:
# ``metrics`` is the one table of measures and the per-thread shards every thread
# writes without a lock; the ``emitter`` thread sends one interval's samples to the
# ``sinks`` (Ganglia, through the ``gmetric`` encoder); ``admin`` serves /metrics
# (Prometheus), /status and /healthz; ``status_cli`` is `dvara status`. It depends on
# the root modules only.
"""
