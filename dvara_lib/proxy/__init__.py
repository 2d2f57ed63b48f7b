"""The data plane: clients, the acceptor, the workers and the relay.

# design:
# One ``DataPlane`` per process: the acceptor thread owns the selector and idle clients,
# hands whole messages to a fixed crew of workers (``dispatch``), and each worker relays
# a message (``relay``) through the member's pool, after the steps that may answer it
# first (``message``: the login gate, legacy getLastError, hello). Per-client state is
# in ``session``; a client's move to another process is described in ``handover``. It
# uses the servers (dvara_lib.backend) and knows nothing of the process around it.
"""
