"""The process: settings in, signals, restart, worker processes, the command line.

# design:
# The top layer. ``app`` reads the settings and runs a ``Server``, which discovers the
# set (dvara_lib.backend), opens one listener per member and runs the data plane
# (dvara_lib.proxy) in this process or, with --processes N, in N worker processes
# (``workers`` in the parent, ``worker`` in each child, ``channel`` between them). The
# main thread only handles signals (their handlers just enqueue) and supervises the
# threads; ``lifecycle`` reloads (SIGHUP) and restarts into new code with the clients
# handed over (SIGUSR2, ``handoff``). Nothing below imports this package.
"""
